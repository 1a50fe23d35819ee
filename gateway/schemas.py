"""Request and response bodies. Our own endpoints (best-of-n, feedback) refuse unknown fields;
the OpenAI-compatible ones ignore fields they don't know, since clients send newer parameters,
and refuse the ones they know but can't honour (logprobs, echo, tools...) with a 400 naming the
field."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from rlhf.formats import ROLE_ALIASES, ROLES


def _utf8(value: str) -> str:
    # JSON may carry lone surrogates ("\ud800"), which protobuf strings cannot hold.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 text (no lone surrogates)") from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]
TokenId = Annotated[int, Field(ge=0, lt=2**32)]

Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
MaxTokens = Annotated[int, Field(ge=1, le=1_000_000)]
Count = Annotated[int, Field(ge=1, le=1024)]

# The chat roles a request may use: the wire's, but "tool" (this API has no tool calling), and
# OpenAI's aliases ("developer"), which the gateway sends as the role they stand for.
ChatRole = Literal[tuple(r for r in ROLES if r != "tool") + tuple(ROLE_ALIASES)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(Strict):
    role: ChatRole
    content: Text = Field(min_length=1, max_length=200_000)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, usage) -> Usage:
        """From the policy's Usage message."""
        return cls(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                   total_tokens=usage.prompt_tokens + usage.completion_tokens)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---- best-of-n ----------------------------------------------------------------------------------

class BestOfNRequest(Strict):
    prompt: Text | None = Field(None, min_length=1, max_length=200_000,
                               description="Plain-text prompt (or give `messages`).")
    messages: list[Message] | None = Field(
        None, min_length=1, max_length=256,
        description="Chat turns, rendered with the chat template.")
    n: Count = Field(4, description="Candidates to sample and rank (1..max_n).")
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: list[Annotated[Text, Field(min_length=1)]] | None = Field(None, max_length=8)
    model: Text = Field("policy", examples=["policy", "base"],
                        description="`base`, `policy` (active adapter) or `policy@vN`.")
    return_candidates: bool = Field(False, description="Return every candidate with its score.")

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        return self


class Candidate(BaseModel):
    index: int = Field(description="Sample index (order of generation).")
    rank: int = Field(description="0 = highest reward.")
    text: str
    score: float | None = Field(description="Reward; null for an empty completion (ranked last).")
    finish_reason: str


class BestOfNResponse(BaseModel):
    request_id: str
    model: str = Field(description="What served it: `base` or `policy@vN`.")
    adapter_version: int = Field(description="Adapter version used; 0 = base model.")
    reward_model_versions: list[str] = Field(
        default_factory=list,
        description="Reward-model versions that scored the candidates (one per versioned scorer "
                    "of the reward service); empty when it scores with none.")
    best: Candidate
    candidates: list[Candidate] | None = None
    usage: Usage


# ---- feedback -----------------------------------------------------------------------------------

class FeedbackRequest(Strict):
    """Feedback on one of the caller's own answers (its `request_id`): one choice and one rating
    per answer; another key's answer is unknown to the caller (404)."""

    request_id: Text = Field(min_length=1, max_length=128)
    chosen_index: int | None = Field(None, ge=0, le=1023,
                                     description="The candidate (its `index`) judged best.")
    rating: int | None = Field(None, ge=1, le=5, description="1 (bad) .. 5 (good).")
    candidate_index: int | None = Field(
        None, ge=0, le=1023, description="Which candidate `rating` is about (default: the best).")
    comment: Text | None = Field(None, max_length=4000)

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.chosen_index is None) == (self.rating is None):
            raise ValueError("give exactly one of `chosen_index` and `rating`")
        if self.candidate_index is not None and self.rating is None:
            raise ValueError("`candidate_index` goes with `rating`")
        return self


class FeedbackResponse(BaseModel):
    id: int
    request_id: str
    kind: Literal["preference", "rating"]


# ---- OpenAI-compatible --------------------------------------------------------------------------

class OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text = Field(examples=["policy", "base"])
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: Count = 1
    best_of: Count | None = Field(
        None, description="Sample this many, return the n best by reward.")
    stream: bool = False
    stop: Text | list[Text] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    user: Text | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(OpenAIBase):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    max_tokens: MaxTokens | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: Text | None = None


class ChatContentPart(BaseModel):
    type: str
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: ChatRole
    content: Text | list[ChatContentPart]
    name: str | None = None


class ChatCompletionRequest(OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    response_format: dict | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str
    score: float | None = Field(None, description="Reward, when ranked with best_of.")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str
    score: float | None = Field(None, description="Reward, when ranked with best_of.")


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
