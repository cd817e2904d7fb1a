"""API-server side for vLLM 0.32: run vLLM's own OpenAI server with depn-serve's auth, admin routes and request
binding. Only `depn serve` calls `run`; nothing here is installed by the plugin."""

from __future__ import annotations

import copy
import functools
import json
import os
from http import HTTPStatus

from prometheus_client import CollectorRegistry
from vllm import envs
from vllm.exceptions import GracefulHTTPError, VLLMValidationError
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.prometheus import get_prometheus_registry

from depn_serve.core.errors import DepnError
from depn_serve.serving.request import reserved_keys
from depn_serve.serving.server.http import AuthMiddleware, admin_router, current_request
from depn_serve.serving.server.state import ServingState, StateSpec

MODEL_FREE_SPECULATION = ("ngram", "ngram_gpu", "suffix")  # proposals drawn from the request's own tokens


def prometheus_registry():
    return get_prometheus_registry()


def parse_args(argv: list[str]):
    """vLLM's own `serve` argument parser, so every vLLM option works as in `vllm serve`."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser(prog="depn serve")).parse_args(argv)
    if args.api_key or os.environ.get("VLLM_API_KEY"):
        raise DepnError("--api-key / VLLM_API_KEY: depn serve authenticates with the tenants file; remove vLLM's "
                        "API key")
    # Both split one request's tokens across micro-batches or ranks in ways the per-token mask index does not follow.
    if args.enable_dbo:
        raise DepnError("--enable-dbo: dual-batch overlap is not supported with per-tenant masks")
    if (args.prefill_context_parallel_size or 1) > 1:
        raise DepnError("--prefill-context-parallel-size: prefill context parallelism is not supported with "
                        "per-tenant masks")
    # vLLM would load adapters named by a request (resolvers) or through its own routes, outside the tenants file.
    if envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING:
        raise DepnError("VLLM_ALLOW_RUNTIME_LORA_UPDATING: runtime LoRA loading is refused by depn serve; list the "
                        "adapters with --lora-modules and give each to its tenant (`lora_adapters` in the tenants "
                        "file)")
    # A draft (a separate model, or heads of this one) runs without the tenant's mask: its proposals, and the
    # acceptance rate that shows in every token's timing, come from the unmasked weights.
    method = (args.speculative_config or {}).get("method")
    if args.speculative_config and (method not in MODEL_FREE_SPECULATION or args.speculative_config.get("model")):
        raise DepnError(f"--speculative-config {json.dumps(args.speculative_config)}: speculative decoding with a "
                        "draft model runs without the tenant's mask and is refused; the model-free methods "
                        f"({', '.join(MODEL_FREE_SPECULATION)}) are accepted")
    validate_parsed_serve_args(args)
    return args


def run(args, spec: StateSpec) -> None:
    import uvloop
    from vllm.entrypoints.launchers.api_server import entry
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    configure_logging_from_args(args)
    if (args.api_server_count or 1) > 1:
        _run_api_servers(args, spec)
        return
    _install(entry, spec.build(prometheus_registry()))
    uvloop.run(entry.run_server(args))


def _run_api_servers(args, spec: StateSpec) -> None:
    """`--api-server-count N`: vLLM's own launcher (engines, N API server processes on one port), with each API
    server process building its own tenant state. They share nothing but the engines and the mask store: a push or
    tenants-file change one of them applies reaches the others through the store within a second
    (`ServingState.sync_store`), as with separate replicas; every one binds the same bits, keyed by content."""
    from vllm.entrypoints.cli import serve as vllm_serve
    from vllm.v1.utils import APIServerProcessManager

    spec.build(CollectorRegistry())  # check the masks and migrate the store once, before N processes read it
    vllm_serve.APIServerProcessManager = functools.partial(
        APIServerProcessManager, target_server_fn=functools.partial(_api_server_process, spec))
    vllm_serve.run_multi_api_server(args)


def _api_server_process(spec: StateSpec, listen_address, sock, args, client_config=None, **uvicorn_kwargs) -> None:
    """One API server process (spawned): its state, with metrics in Prometheus' multiprocess mode (vLLM set it up),
    then vLLM's own API server worker."""
    from vllm.entrypoints.launchers.api_server import entry
    from vllm.v1.utils import run_api_server_worker_proc

    from . import _log_like_vllm

    _log_like_vllm()
    _install(entry, spec.build(CollectorRegistry(), multiprocess=True))
    run_api_server_worker_proc(listen_address, sock, args, client_config, **uvicorn_kwargs)


def _install(entry, state: ServingState) -> None:
    build_app = entry.build_app
    init_app_state = entry.init_app_state

    def patched_build_app(args, *rest, **kwargs):
        app = build_app(args, *rest, **kwargs)
        app.include_router(admin_router(state))
        # vLLM's set-up already built the middleware stack once; Starlette rebuilds it lazily on first use.
        app.middleware_stack = None
        app.add_middleware(AuthMiddleware, state=state)
        return app

    async def patched_init_app_state(engine_client, app_state, args, *rest, **kwargs):
        await init_app_state(engine_client, app_state, args, *rest, **kwargs)
        # Restore every tenant's masks before uvicorn starts answering /health.
        await state.start(lambda method, rpc_args: engine_client.collective_rpc(method, args=rpc_args))

    entry.build_app = patched_build_app
    entry.init_app_state = patched_init_app_state
    _bind_requests(state)


def _bind_requests(state: ServingState) -> None:
    """Every request that reaches the engine carries the tenant and mask version the auth layer admitted it with, or
    is refused."""
    add_request = AsyncLLM.add_request
    generate = AsyncLLM.generate

    async def patched_add_request(self, request_id, prompt, params, arrival_time=None, lora_request=None, *args,
                                  **kwargs):
        request = current_request.get()  # admitted by the auth layer, with the mask version it admitted
        if request is None:
            raise GracefulHTTPError("depn-serve: no authenticated tenant for this request", HTTPStatus.UNAUTHORIZED)
        if not isinstance(params, SamplingParams):
            raise VLLMValidationError("depn-serve serves text generation only")
        reserved = reserved_keys(params.extra_args)
        if reserved:
            state.metrics.refused.labels("400").inc()
            raise VLLMValidationError(
                f"vllm_xargs keys {reserved} are reserved: the mask comes from the API key", parameter="vllm_xargs"
            )
        if "kv_transfer_params" in (params.extra_args or {}):
            state.metrics.refused.labels("400").inc()
            raise VLLMValidationError("kv_transfer_params: KV transfer is not open to tenants under depn serve",
                                      parameter="kv_transfer_params")
        if lora_request is not None and not _owns(state, request.tenant, lora_request.lora_name):
            state.metrics.refused.labels("404").inc()  # the answer vLLM gives for a model it does not serve
            raise GracefulHTTPError(f"The model `{lora_request.lora_name}` does not exist.", HTTPStatus.NOT_FOUND)
        # A copy: vLLM reuses the caller's params across the requests one API call fans out into (beam search,
        # generative scoring), and each of them must pass the reserved-key check above.
        params = copy.copy(params)
        params.extra_args = {**(params.extra_args or {}), **request.to_extra_args()}
        state.metrics.requests.labels(state.metrics.tenant_label(request.tenant)).inc()
        return await add_request(self, request_id, prompt, params, arrival_time, lora_request, *args, **kwargs)

    async def patched_generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        request = current_request.get()
        delta = getattr(sampling_params, "output_kind", None) == RequestOutputKind.DELTA
        waiting = object()
        state.metrics.waiting(waiting, request.tenant if request is not None else None)
        charged: int | None = None  # generated tokens counted against the tenant's minute (None: not the prompt yet)
        try:
            async for output in generate(self, prompt, sampling_params, request_id, *args, **kwargs):
                if request is not None:
                    count = sum(len(c.token_ids) for c in output.outputs)  # new tokens (delta), or all so far
                    if charged is None:
                        state.limiter.charge(request.tenant, len(output.prompt_token_ids or ()))
                        charged = 0
                    state.limiter.charge(request.tenant, count if delta else count - charged)
                    charged = charged + count if delta else count
                    if delta or output.finished:
                        label = state.metrics.tenant_label(request.tenant)
                        state.metrics.generated_tokens.labels(label).inc(count)
                state.metrics.started(waiting)
                yield output
        finally:
            state.metrics.finished(waiting)

    AsyncLLM.add_request = patched_add_request
    AsyncLLM.generate = patched_generate


def _owns(state: ServingState, tenant_id: str, adapter: str) -> bool:
    tenant = state.tenants.find(tenant_id)
    return tenant is not None and adapter in tenant.lora_adapters
