"""Tokenizers of Hugging Face folders against transformers (AutoTokenizer on the same folder) and
SentencePiece itself: same ids for plain text and for chats, stop ids, streaming without U+FFFD."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import fixture_path
from multimodal.chat_template import ChatTemplateError, render_chat
from multimodal.formats.hf_tokenizer import FolderSentencePiece, HFTokenizer, load_folder_tokenizer
from multimodal.tokenizer import StreamDecoder, Tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
          "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama 2's template as its tokenizer_config.json ships it: bos written as text before every user turn
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
          "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
TEXTS = ["Hello world, a bus with people.", "café, naïve – 東京 🚌", "tabs\tand\nnew lines\n\n", "x = 3.14 * r ** 2",
         "<|im_start|>user\nhi<|im_end|>", "plain <|im_end|> inside"]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a city."},
        {"role": "assistant", "content": "東京."}, {"role": "user", "content": "And a café?"}]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "A bus with people stops at the café.",
          "Tokyo (東京) is a city; naïve questions welcome.", "user assistant system: hello, how are you?"]


def bpe_folder(folder: Path, *, bos_post_processor: bool = False, tokenizer_class: str = "PreTrainedTokenizerFast") -> Path:
    """A byte-level BPE trained here on a few sentences, with ChatML special tokens, saved as a folder."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if bos_post_processor:  # a base whose plain prompts start with bos (Llama 3 style)
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.token_to_id("<|endoftext|>"))])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": tokenizer_class, "bos_token": "<|endoftext|>" if bos_post_processor else None,
              "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "chat_template": CHATML}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def reference(folder: Path) -> "transformers.PreTrainedTokenizerBase":
    return transformers.AutoTokenizer.from_pretrained(folder)


def chat_ids(ref: "transformers.PreTrainedTokenizerBase", messages: list[dict]) -> list[int]:
    out = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if not isinstance(out, list) else out)


@pytest.mark.parametrize(("bos", "cls"), [(False, "PreTrainedTokenizerFast"), (True, "PreTrainedTokenizerFast"),
                                          (False, "GPT2Tokenizer")], ids=["no-bos", "bos-post-processor", "gpt2-class"])
def test_bpe_folder_matches_transformers(tmp_path: Path, bos: bool, cls: str) -> None:
    folder = bpe_folder(tmp_path, bos_post_processor=bos, tokenizer_class=cls)
    ours, ref = load_folder_tokenizer(folder), reference(folder)
    assert isinstance(ours, HFTokenizer)
    assert ours.add_bos is bos
    for text in TEXTS:
        expected = ref(text)["input_ids"]
        assert ours.encode(text, bos=ours.add_bos) == expected, text
        if "<|im_end|>" not in text:  # a stop token carries no answer text; everything else round-trips
            plain = ref(text, add_special_tokens=False)["input_ids"]
            assert ours.decode(ours.encode(text, bos=True)) == text == ref.decode(plain)
    assert ours.encode("<|im_start|>", bos=False) == [ref.convert_tokens_to_ids("<|im_start|>")]
    assert ours.encode_chat(CHAT) == chat_ids(ref, CHAT)
    assert ours.render_chat(CHAT) == ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    im_end = ref.convert_tokens_to_ids("<|im_end|>")
    assert ours.eos_id == im_end and im_end in ours.stop_ids
    assert ours.n_words == len(ref)


def test_stop_ids_from_generation_config(tmp_path: Path) -> None:
    folder = bpe_folder(tmp_path, tokenizer_class="GPT2Tokenizer")
    endoftext = reference(folder).convert_tokens_to_ids("<|endoftext|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [endoftext, 7]}))
    ours = load_folder_tokenizer(folder)
    assert {endoftext, 7, ours.eos_id} <= ours.stop_ids


def test_chat_template_file_wins(tmp_path: Path) -> None:
    """transformers 5 saves templates as chat_template.jinja, which overrides tokenizer_config.json."""
    folder = bpe_folder(tmp_path)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    ours, ref = load_folder_tokenizer(folder), reference(folder)
    assert ours.encode_chat(CHAT) == chat_ids(ref, CHAT)


def test_streaming_never_splits_a_character(tmp_path: Path) -> None:
    ours = load_folder_tokenizer(bpe_folder(tmp_path))
    text = "naïve café – 東京 🚌 ok, 🚌🚌 ünïcödé"
    ids = ours.encode(text, bos=False)
    assert len(ids) > len(text) // 2  # the tiny vocabulary falls back to bytes: characters span tokens
    stream = StreamDecoder(ours)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == ours.decode(ids) == text


def test_template_helpers_and_sandbox() -> None:
    template = ("{{ messages[0]['content'] | tojson }}{% if tools is none %} no-tools{% endif %}"
                "{% generation %} gen{% endgeneration %}{{ bos_token }}|{{ strftime_now('%Y') | length }}")
    rendered = render_chat(template, [{"role": "user", "content": "<b>é</b>", "name": None}], bos_token=None, eos_token="E")
    assert rendered == '"<b>é</b>" no-tools gen|4'
    with pytest.raises(ChatTemplateError, match="alternate"):
        render_chat(LLAMA2, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                    bos_token="<s>", eos_token="</s>")
    with pytest.raises(ChatTemplateError):  # the immutable sandbox: no changing the caller's messages
        render_chat("{{ messages.append(1) }}", [], bos_token=None, eos_token=None)


# --- SentencePiece: a folder with only tokenizer.model ----------------------------------------------------


@pytest.fixture
def sp_folder(tmp_path: Path) -> Path:
    model = fixture_path("llama/tokenizer.model")
    (tmp_path / "tokenizer.model").write_bytes(model.read_bytes())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": True, "chat_template": LLAMA2}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return tmp_path


def test_sentencepiece_folder_matches_transformers(sp_folder: Path) -> None:
    ours, ref = load_folder_tokenizer(sp_folder), reference(sp_folder)
    assert isinstance(ours, FolderSentencePiece) and isinstance(ours, Tokenizer)
    assert ours.add_bos and ours.stop_ids == {2} and ours.chat_template == LLAMA2
    for text in TEXTS + ["a <s>b</s>c"]:
        assert ours.encode(text, bos=True) == ref(text)["input_ids"], text
    assert ours.encode_chat(CHAT) == chat_ids(ref, CHAT)
    assert ours.encode_chat(CHAT).count(1) == 2  # bos from the template text only, once per user turn


def test_sentencepiece_folder_matches_sentencepiece(sp_folder: Path) -> None:
    """Between special tokens the ids are SentencePiece's own (the model was trained on them), also
    where transformers' converted tokenizer differs (runs of spaces)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))
    ours = load_folder_tokenizer(sp_folder)
    for text in TEXTS + ["  two  spaces", " leading"]:  # transformers: ▁▁ merges, no ▁ added before a space
        assert ours.encode(text, bos=True) == [1] + sp.encode(text), text
    assert ours.encode("Hello world, a bus with people.", bos=False) == [15043, 3186, 29892, 263, 3593, 411, 2305, 29889]
    assert ours.encode("[INST] hi [/INST] yes </s><s>[INST] x<s> b", bos=False) == (
        sp.encode("[INST] hi [/INST] yes ") + [2, 1] + sp.encode("[INST] x") + [1] + sp.encode(" b"))


def test_converted_sentencepiece_tokenizer_json(sp_folder: Path, tmp_path: Path) -> None:
    """A Llama 2 style folder with tokenizer.json (SentencePiece converted by transformers: Metaspace,
    byte fallback, a bos post-processor) is read through the tokenizers library."""
    folder = tmp_path / "converted"
    reference(sp_folder).save_pretrained(folder)
    (folder / "tokenizer.model").unlink(missing_ok=True)
    # the save drops legacy; transformers 5's LlamaTokenizer class then rebuilds the pipeline without the
    # "▁" after special tokens, unlike the file (and Meta's chat format); the file's own behaviour is ours
    config = json.loads((folder / "tokenizer_config.json").read_text()) | {"legacy": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, ref = load_folder_tokenizer(folder), reference(folder)
    assert isinstance(ours, HFTokenizer) and ours.add_bos and ours.bos_id == 1 and ours.eos_id == 2
    for text in TEXTS:
        assert ours.encode(text, bos=ours.add_bos) == ref(text)["input_ids"], text
    assert ours.encode_chat(CHAT) == chat_ids(ref, CHAT)
    text = "naïve café – 東京 🚌, ok"
    stream = StreamDecoder(ours)
    pieces = [stream.push(i) for i in ours.encode(text, bos=False)] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == text
