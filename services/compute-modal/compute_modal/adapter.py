"""The one narrow seam between compute-modal and Modal: spawn, get, cancel, progress.

``ModalAdapter`` keeps the SDK's own semantics so the provider's interpretation is tested against
them: ``get`` polls once and raises the builtin ``TimeoutError`` while the call runs,
``modal.exception.OutputExpiredError`` when the result is gone (7 days after completion, or an
unknown id), ``modal.exception.RemoteError`` after a cancel, and re-raises the function's own
exception when it failed. ``ModalSdkAdapter`` is the real thing (``.aio`` calls only);
``compute_modal.inprocess.InProcessModal`` runs the app's function body locally.
"""

from __future__ import annotations

from typing import Any, Protocol

import modal
from pydantic import SecretStr


class ModalNotConfigured(Exception):
    """No Modal credentials are configured; the message says which variables to set."""


class ModalAdapter(Protocol):
    async def check(self) -> None:
        """Raise unless the credentials work and the app's function is deployed."""

    async def spawn(self, job_id: str, spec: dict[str, Any], gpu: str) -> str:
        """Start the function on a ``gpu`` (a Modal GPU type such as ``L4``); returns the
        FunctionCall id (``fc-...``)."""

    async def get(self, call_id: str) -> dict[str, Any]:
        """Poll once (``get(timeout=0)``); see the module docstring for what it raises."""

    async def cancel(self, call_id: str) -> None: ...

    async def read_progress(self, key: str) -> Any:
        """The progress Dict's value under ``key``, or None."""

    async def write_progress(self, key: str, value: Any) -> None: ...

    async def put_progress_if_absent(self, key: str, value: Any) -> bool:
        """Write ``value`` under ``key`` unless the key exists (atomic); True when written."""

    async def delete_progress(self, key: str) -> None: ...


class ModalSdkAdapter:
    """The Modal SDK with the operator's token, one explicit client and environment."""

    def __init__(
        self,
        token_id: SecretStr,
        token_secret: SecretStr,
        environment: str,
        app_name: str,
        function_name: str,
        progress_dict: str,
    ) -> None:
        self._token_id = token_id
        self._token_secret = token_secret
        self._environment = environment
        self._app_name = app_name
        self._function_name = function_name
        self._progress_dict = progress_dict
        self._client: modal.Client | None = None
        # Each new handle hydrates with its own lookup: one of each per process.
        self._function_handle: modal.Function | None = None
        self._function_on_gpu: dict[str, modal.Function] = {}
        self._dict_handle: modal.Dict | None = None

    def _get_client(self) -> modal.Client:
        if self._client is None:
            token_id = self._token_id.get_secret_value()
            token_secret = self._token_secret.get_secret_value()
            if not token_id or not token_secret:
                raise ModalNotConfigured(
                    "Modal is not configured: set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET "
                    "(a token of the operator's Modal workspace)"
                )
            # Lazy: nothing is sent until the first call.
            self._client = modal.Client.from_credentials(token_id, token_secret)
        return self._client

    def _function(self) -> modal.Function:
        if self._function_handle is None:
            self._function_handle = modal.Function.from_name(
                self._app_name,
                self._function_name,
                environment_name=self._environment,
                client=self._get_client(),
            )
        return self._function_handle

    def _dict(self) -> modal.Dict:
        if self._dict_handle is None:
            self._dict_handle = modal.Dict.from_name(
                self._progress_dict,
                environment_name=self._environment,
                create_if_missing=True,
                client=self._get_client(),
            )
        return self._dict_handle

    async def check(self) -> None:
        await self._function().hydrate.aio()

    async def spawn(self, job_id: str, spec: dict[str, Any], gpu: str) -> str:
        # with_options gives the deployed function a container pool per GPU type.
        function = self._function_on_gpu.get(gpu)
        if function is None:
            function = self._function_on_gpu[gpu] = self._function().with_options(gpu=gpu)
        call = await function.spawn.aio(job_id, spec)
        return str(call.object_id)

    async def get(self, call_id: str) -> dict[str, Any]:
        # from_id does no I/O; its .aio form is deprecated.
        return await modal.FunctionCall.from_id(call_id, client=self._get_client()).get.aio(timeout=0)

    async def cancel(self, call_id: str) -> None:
        call = modal.FunctionCall.from_id(call_id, client=self._get_client())
        await call.cancel.aio(terminate_containers=False)

    async def read_progress(self, key: str) -> Any:
        return await self._dict().get.aio(key)

    async def write_progress(self, key: str, value: Any) -> None:
        await self._dict().put.aio(key, value)

    async def put_progress_if_absent(self, key: str, value: Any) -> bool:
        return bool(await self._dict().put.aio(key, value, skip_if_exists=True))

    async def delete_progress(self, key: str) -> None:
        try:
            await self._dict().pop.aio(key)
        except KeyError:
            pass
