"""The browser app. Gradio's usage analytics are off unless the operator turns them on (privacy by default)."""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
