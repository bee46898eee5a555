"""LiteLLM's proxy request pipeline, in this process, for the integration tests.

LiteLLM's FastAPI app (`litellm.proxy.proxy_server`) needs the whole `litellm[proxy]` extra and
takes about 15 s to import. Its inference routes are thin: each reads the body, adds the key's
details to the metadata, hands the request to `ProxyBaseLLMRequestProcessing.
base_process_llm_request` (which builds LiteLLM's request data, runs the callbacks' pre-call
hooks, calls the Router and runs the logging), and maps a failure with `handle_llm_api_exception`
and its `ProxyException` handler. `LiteLLMProxy` does the same with those very functions, a real
`litellm.Router` pointed at the mock upstream and a real `ProxyLogging`. The one stand-in is a
module in place of `proxy_server`, holding the globals that code imports from it.
"""

from __future__ import annotations

import hashlib
import sys
import types
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import litellm
import yaml  # type: ignore[import-untyped]
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from litellm.integrations.custom_logger import CustomLogger
from litellm.llms.custom_httpx.async_client_cleanup import close_litellm_async_clients
from litellm.proxy._types import ProxyException, UserAPIKeyAuth
from litellm.proxy.common_request_processing import ProxyBaseLLMRequestProcessing
from litellm.proxy.common_utils.callback_utils import initialize_callbacks_on_proxy
from litellm.proxy.common_utils.http_parsing_utils import read_request_body
from litellm.proxy.common_utils.user_api_key_cache import UserApiKeyCache
from litellm.proxy.utils import ProxyLogging
from litellm.router import Router

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
# What the LiteLLM proxy's config.yaml would hold under `general_settings`: the tests steer the
# mock upstream with x-mock-* headers, which LiteLLM forwards only when told to.
GENERAL_SETTINGS: dict[str, Any] = {"forward_client_headers_to_llm_api": True}


class LiteLLMProxy:
    def __init__(self, upstream_url: str, *, dead_url: str) -> None:
        upstream = {"api_base": f"{upstream_url}/v1", "api_key": "sk-upstream"}
        self.router = Router(
            model_list=[
                {"model_name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o", **upstream}},
                {
                    # Priced here and unknown to the sidecar: the cost it records is LiteLLM's.
                    "model_name": "house-model",
                    "litellm_params": {
                        "model": "openai/house-model",
                        "input_cost_per_token": 0.001,
                        "output_cost_per_token": 0.002,
                        **upstream,
                    },
                },
                {
                    "model_name": "claude",
                    "litellm_params": {
                        "model": "anthropic/claude-sonnet-4-20250514",
                        "api_base": upstream_url,
                        "api_key": "sk-upstream",
                    },
                },
                {
                    # Nothing listens there: every call fails, then falls back to gpt-4o.
                    "model_name": "flaky",
                    "litellm_params": {
                        "model": "openai/gpt-4o",
                        "api_base": f"{dead_url}/v1",
                        "api_key": "sk-upstream",
                    },
                },
            ],
            fallbacks=[{"flaky": ["gpt-4o"]}],
            num_retries=0,
            retry_after=0,
        )
        self.cache = UserApiKeyCache()
        self.logging = ProxyLogging(user_api_key_cache=self.cache)
        self.app = self._build_app()

    @contextmanager
    def running(
        self, *callbacks: CustomLogger, config_file: Path | None = None
    ) -> Iterator[LiteLLMProxy]:
        """Install the proxy globals; register the callbacks `config_file`'s
        `litellm_settings.callbacks` names, as the proxy's config loading does, then `callbacks`."""
        server = types.ModuleType("litellm.proxy.proxy_server")
        server.__dict__.update(
            llm_router=self.router,
            premium_user=False,
            prisma_client=None,
            proxy_logging_obj=self.logging,
            user_api_key_cache=self.cache,
            open_telemetry_logger=None,
            general_settings=GENERAL_SETTINGS,
            proxy_config=None,
            model_max_budget_limiter=None,
            shared_aiohttp_session=None,
        )
        saved = sys.modules.get(server.__name__)
        sys.modules[server.__name__] = server
        litellm.callbacks = []
        try:
            if config_file is not None:
                settings = yaml.safe_load(config_file.read_text())["litellm_settings"]
                initialize_callbacks_on_proxy(
                    value=settings["callbacks"],
                    premium_user=False,
                    config_file_path=str(config_file),
                    litellm_settings=settings,
                )
            litellm.callbacks = [*litellm.callbacks, *callbacks]
            yield self
        finally:
            litellm.logging_callback_manager._reset_all_callbacks()  # type: ignore[no-untyped-call]
            if saved is None:
                del sys.modules[server.__name__]
            else:
                sys.modules[server.__name__] = saved

    async def aclose(self) -> None:
        await close_litellm_async_clients()  # type: ignore[no-untyped-call]
        # Closed, but still cached: a later test's router for the same upstream would be handed
        # a closed client ("Cannot send a request, as the client has been closed").
        litellm.in_memory_llm_clients_cache.flush_cache()  # type: ignore[no-untyped-call]

    def _build_app(self) -> FastAPI:
        app = FastAPI()
        proxy = self

        @app.exception_handler(ProxyException)
        async def openai_error(_: Request, exc: ProxyException) -> JSONResponse:
            # As proxy_server's handler: the status, the OpenAI error body, the headers.
            status = int(exc.code) if exc.code else 500
            return JSONResponse({"error": exc.to_dict()}, status_code=status, headers=exc.headers)

        async def process(
            request: Request,
            fastapi_response: Response,
            user_api_key_dict: UserAPIKeyAuth,
            data: dict[str, Any],
            route_type: Any,
        ) -> Any:
            processor = ProxyBaseLLMRequestProcessing(data=data)
            try:
                return await processor.base_process_llm_request(
                    request=request,
                    fastapi_response=fastapi_response,
                    user_api_key_dict=user_api_key_dict,
                    route_type=route_type,
                    proxy_logging_obj=proxy.logging,
                    llm_router=proxy.router,
                    general_settings=GENERAL_SETTINGS,
                    proxy_config=None,  # type: ignore[arg-type]
                    select_data_generator=_sse if route_type == "acompletion" else None,
                )
            except Exception as exc:
                raise await processor.handle_llm_api_exception(
                    e=exc, user_api_key_dict=user_api_key_dict, proxy_logging_obj=proxy.logging
                ) from exc

        @app.post(CHAT)
        async def chat_completion(
            request: Request,
            fastapi_response: Response,
            user_api_key_dict: UserAPIKeyAuth = Depends(_authenticate),  # noqa: B008
        ) -> Any:
            data = await read_request_body(request=request)
            if not isinstance(data.get("metadata"), dict):
                data["metadata"] = {}
            data["metadata"]["user_api_key_user_id"] = user_api_key_dict.user_id
            return await process(request, fastapi_response, user_api_key_dict, data, "acompletion")

        @app.post(MESSAGES)
        async def anthropic_response(
            request: Request,
            fastapi_response: Response,
            user_api_key_dict: UserAPIKeyAuth = Depends(_authenticate),  # noqa: B008
        ) -> Any:
            data = await read_request_body(request=request)
            route = "anthropic_messages"
            return await process(request, fastapi_response, user_api_key_dict, data, route)

        return app


async def _authenticate(request: Request) -> UserAPIKeyAuth:
    # LiteLLM's own check looks the virtual key up in its database; any key passes here.
    _, _, key = request.headers.get("authorization", "").partition(" ")
    key = key or request.headers.get("x-api-key", "")
    return UserAPIKeyAuth(
        api_key=hashlib.sha256(key.encode()).hexdigest() if key else None,
        user_id="litellm-user",
        request_route=request.url.path,
    )


def _sse(
    response: Any,
    user_api_key_dict: UserAPIKeyAuth,
    request_data: dict[str, Any],
    request: Request | None = None,
    **_: Any,
) -> AsyncIterator[str]:
    async def frames() -> AsyncIterator[str]:
        async for chunk in response:
            yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
        yield "data: [DONE]\n\n"

    return frames()
