"""The attack suite's target through an OpenAI-compatible completions API (`depn serve`, or any vLLM server):
exactly what a client holding one API key can do. Prompts go as token ids and answers come back as token ids
(vLLM's `return_tokens_as_token_ids`), so nothing is lost to re-tokenization."""

from __future__ import annotations

from collections.abc import Sequence

CHUNK = 64  # prompts per request


class ApiOracle:
    def __init__(self, base_url: str, api_key: str, model: str | None = None, timeout: float = 300):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=timeout)
        self.model = model or self.client.models.list().data[0].id

    def _complete(self, prompts: Sequence[list[int]], **options) -> list:
        choices = []
        for start in range(0, len(prompts), CHUNK):
            answer = self.client.completions.create(
                model=self.model, prompt=[list(p) for p in prompts[start : start + CHUNK]],
                extra_body={"return_tokens_as_token_ids": True}, **options)
            choices += sorted(answer.choices, key=lambda c: c.index)
        return choices

    def greedy(self, prompts, max_tokens):
        return [_ids(c) for c in self._complete(prompts, max_tokens=max_tokens, temperature=0.0, logprobs=1)]

    def sample(self, prompts, max_tokens, temperature, n, seed):
        choices = self._complete(prompts, max_tokens=max_tokens, temperature=temperature, top_p=1.0, n=n, seed=seed,
                                 logprobs=1)
        return [[_ids(c) for c in choices[i * n : (i + 1) * n]] for i in range(len(prompts))]

    def top_logprobs(self, prefixes, k):
        choices = self._complete(prefixes, max_tokens=1, temperature=0.0, logprobs=k)
        return [{_id(token): lp for token, lp in c.logprobs.top_logprobs[0].items()} for c in choices]


def _id(token: str) -> int:
    """vLLM spells a token as 'token_id:<n>' when asked for token ids."""
    return int(token.rsplit(":", 1)[1])


def _ids(choice) -> list[int]:
    return [_id(t) for t in choice.logprobs.tokens]
