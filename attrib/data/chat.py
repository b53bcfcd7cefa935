"""Conversations: a row with a `messages` field (a list of {"role", "content"}; the usual supervised
fine-tuning layout) and no text field. `ChatFormat` renders it with a chat template, and with
`loss_on="assistant"` only the assistant turns carry loss (see README, "Chat data").
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from attrib.data.rows import MESSAGES_FIELD, Document, conversation_contents
from attrib.errors import InputError
from attrib.options import CorpusOptions
from attrib.runtime import flag

GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")  # templates that mark assistant text themselves


@dataclass
class ChatFormat:
    """How conversations become text and loss masks: a Jinja chat template and the tokenizer
    whose special tokens it uses.

    `template` None: conversations are refused with `missing` as the reason. `tokenizer` None
    (the prefilter without --model): conversations are read as their contents alone.
    """

    option: str  # --chat-template as given: auto, none or a file
    template: str | None
    tokenizer: object = None
    missing: str = ""

    def identity(self) -> dict:
        """What a manifest records: the option and a hash of the template it resolved to."""
        digest = hashlib.sha256(self.template.encode()).hexdigest() if self.template is not None else None
        return {"chat_template": self.option, "template_sha256": digest}

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self.tokenizer is None:
            return conversation_contents(messages) + ("\n\n" if add_generation_prompt else "")
        if self.template is None:
            raise InputError(self.missing)
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja raises TemplateError subclasses, templates raise their own
            raise InputError(f"the chat template ({self.option}) failed on a conversation: {exc}") from exc

    def prepare(self, doc: Document, loss_on: str = "all") -> Document:
        """The document as the model sees it: a conversation rendered (with its assistant spans
        under --loss-on assistant); a text unchanged."""
        if doc.messages is None:
            if loss_on == "assistant":
                raise InputError(
                    f"document {doc.doc_id} is plain text, but {flag('loss_on', 'assistant')} needs conversations "
                    f"('{MESSAGES_FIELD}'); use {flag('loss_on', 'all')}"
                )
            return doc
        text = self.render(doc.messages)
        spans = self.assistant_spans(doc.messages, text, doc.doc_id) if loss_on == "assistant" else None
        return Document(doc.doc_id, text, doc.messages, spans)

    def assistant_spans(self, messages: list[dict], text: str, doc_id: str) -> list[tuple[int, int]]:
        """Character spans of `text` (the rendered conversation) written by the assistant.

        A template with `{% generation %}` blocks marks them itself: the tokens of
        `apply_chat_template(..., return_assistant_tokens_mask=True)`, as spans. Otherwise each
        assistant turn i spans from the end of messages[:i] rendered with the generation prompt
        to the end of messages[:i+1] rendered: its content and what the template writes up to
        the next message (its end-of-turn marker, typically).
        """
        if self.tokenizer is None or self.template is None:
            return []
        if GENERATION_BLOCK.search(self.template):
            marked = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=True,
                                                        return_dict=True, return_assistant_tokens_mask=True)
            encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            spans: list[tuple[int, int]] = []
            for flag, (start, end) in zip(marked["assistant_masks"], encoding["offset_mapping"]):
                if not flag:
                    continue
                if spans and start <= spans[-1][1]:
                    spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
                else:
                    spans.append((start, end))
            return spans
        spans = []
        for index, item in enumerate(messages):
            if item["role"] != "assistant":
                continue
            before = self.render(messages[:index], add_generation_prompt=True) if index else ""
            through = self.render(messages[: index + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise InputError(
                    f"document {doc_id}: the chat template ({self.option}) does not render this conversation turn "
                    "by turn, so its assistant turns cannot be found; mark them with {% generation %} in the template"
                )
            spans.append((len(before), len(through)))
        return spans

    def query_texts(self, messages: list[dict]) -> tuple[str, str]:
        """(prompt, completion) of a chat query: the conversation before its last (assistant) turn
        rendered with the generation prompt, and what the whole conversation adds to it."""
        prompt = self.render(messages[:-1], add_generation_prompt=True)
        full = self.render(messages)
        if not full.startswith(prompt):
            raise InputError(
                f"the chat template ({self.option}) renders the conversation without its last turn and the "
                "generation prompt as something other than the start of the whole conversation"
            )
        return prompt, full[len(prompt):]


def chat_format(tokenizer, option: str = "auto") -> ChatFormat:
    """The ChatFormat of --chat-template `option` for `tokenizer` (None: contents alone)."""
    CorpusOptions.checked(chat_template=option)
    if option == "none":
        return ChatFormat(option, None, tokenizer, "conversations ('messages') need a chat template, but "
                          f"{flag('chat_template', 'none')} refuses them; pass {flag('chat_template', 'auto')} or the "
                          "path of a template file")
    if option != "auto":
        try:
            template = Path(option).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{flag('chat_template', option)} cannot be read: {exc}") from exc
        return ChatFormat(option, template, tokenizer)
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(template, dict):  # named templates: the default one renders conversations
        template = template.get("default")
    return ChatFormat(option, template, tokenizer, "the model's tokenizer has no chat template, so its "
                      f"conversations ('messages') cannot be rendered; pass {flag('chat_template')} with a template file")


def check_chat_agrees(input_manifest: dict, current: dict, source: str) -> None:
    """Refuse an input whose conversations were rendered with another template, or whose loss
    was taken over other tokens (--loss-on). An input that rendered no conversation (factors fitted
    on plain text: Grosse et al.'s setting for dialogue queries) and an older manifest that records
    no chat are not compared: their template and loss_on changed nothing."""
    recorded = input_manifest.get("settings", {}).get("chat")
    if not recorded or input_manifest.get("counts", {}).get("rendered_conversations") is False:
        return
    if "loss_on" in recorded and "loss_on" in current and recorded["loss_on"] != current["loss_on"]:
        raise InputError(
            f"{source} was computed with {flag('loss_on', recorded['loss_on'])}, this run has {flag('loss_on', current['loss_on'])}; "
            f"the fit and the scores must take the loss over the same tokens: pass {flag('loss_on', recorded['loss_on'])} "
            "or recompute it"
        )
    if recorded.get("template_sha256") != current.get("template_sha256"):
        def named(identity: dict) -> str:
            digest = identity.get("template_sha256")
            return f"{identity.get('chat_template')} ({'sha256 ' + digest[:12] if digest else 'no template'})"

        raise InputError(
            f"{source} rendered conversations with chat template {named(recorded)}, this run with {named(current)}; "
            f"pass the same {flag('chat_template')} or recompute it"
        )
