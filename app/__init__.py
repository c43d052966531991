"""The browser app. Usage analytics and hub telemetry are off unless the operator turns them on
(privacy by default)."""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
