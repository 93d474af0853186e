"""vLLM's `/tokenize` and `/detokenize`, answered by the ingress's own tokenizer: the token ids
a prompt or chat becomes before any engine sees it (what `usage.prompt_tokens` counts), and
the text of token ids. Bodies follow vLLM's request models, refused field by field as the
generation routes are (`vllm_fields.py`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from fastapi import Body, FastAPI
from pydantic import Field, ValidationError

from pdserve.deployments.api.chat_messages import ChatMessage
from pdserve.deployments.api.openai_answers import ApiModel, error_docs
from pdserve.deployments.api.openai_models import invalid_request
from pdserve.deployments.api.vllm_fields import StrictBody

if TYPE_CHECKING:
    from pdserve.deployments.frontend import FrontendAPI


class TokenizeCompletionBody(StrictBody):
    """A text prompt, tokenized as /v1/completions tokenizes it."""

    vllm_api: ClassVar[str | None] = "tokenize_completion"
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    """Add the tokenizer's special tokens (e.g. BOS), as /v1/completions does."""
    return_token_strs: bool | None = False
    """Also return each token's string."""


class TokenizeChatBody(StrictBody):
    """Messages, through the model's chat template, as /v1/chat/completions renders them."""

    vllm_api: ClassVar[str | None] = "tokenize_chat"
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    """End with the assistant's turn opening, as a chat request does."""
    return_token_strs: bool | None = False


class TokenizeResponse(ApiModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeBody(StrictBody):
    vllm_api: ClassVar[str | None] = "detokenize"
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(ApiModel):
    prompt: str


_TOKENIZE_BODY = ("Either `{prompt, add_special_tokens?, return_token_strs?}` (a text prompt) or "
                  "`{messages, add_generation_prompt?, return_token_strs?}` (a chat); `model` optional")


def add_tokenize_routes(app: FastAPI, get_frontend: Callable[[], FrontendAPI], dependencies: list[Any]) -> None:
    """POST /tokenize (a `prompt` or `messages` body) and POST /detokenize."""

    @app.post("/tokenize", dependencies=dependencies, responses=error_docs(("default", "Server error")))
    async def tokenize(body: Annotated[dict[str, Any], Body(description=_TOKENIZE_BODY)]) -> TokenizeResponse:
        req = _validated(TokenizeChatBody if "messages" in body else TokenizeCompletionBody, body)
        frontend = get_frontend()
        if req.model is not None:
            frontend.check_model(req.model)
        if isinstance(req, TokenizeChatBody):
            ids, strs = await frontend.tokenize([m.as_template_dict() for m in req.messages],
                                                add_special_tokens=False,
                                                add_generation_prompt=req.add_generation_prompt)
        else:
            ids, strs = await frontend.tokenize(req.prompt, add_special_tokens=req.add_special_tokens,
                                                add_generation_prompt=False)
        return TokenizeResponse(count=len(ids), max_model_len=frontend.max_model_len, tokens=ids,
                                token_strs=strs if req.return_token_strs else None)

    @app.post("/detokenize", dependencies=dependencies, responses=error_docs(("default", "Server error")))
    async def detokenize(body: DetokenizeBody) -> DetokenizeResponse:
        frontend = get_frontend()
        if body.model is not None:
            frontend.check_model(body.model)
        return DetokenizeResponse(prompt=await frontend.detokenize(body.tokens))


def _validated(model: type[StrictBody], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise invalid_request(e.errors()) from None
