"""The one place where trio meets asyncio.

py-libp2p runs on trio; grpc.aio and the rest of the node run on asyncio. Instead of two
threads we run trio as a *guest* inside the asyncio loop
(`trio.lowlevel.start_guest_run`): both schedulers share one thread, trio hands its
callbacks to asyncio with `loop.call_soon_threadsafe`, and only trio's I/O wait happens on
a helper thread that trio manages itself. So no locks are needed, but code must still say
which side it runs on: trio code awaits trio things, asyncio code awaits asyncio things.

`TrioGuest` owns the guest run. Its root is one trio nursery; every task it starts lives
in that nursery and is cancelled by `stop()`.

    guest = TrioGuest()
    await guest.start()                         # asyncio side
    host = await guest.start_task(p2p_host.run)  # long-lived trio task, returns its
                                                 # task_status.started() value
    n = await guest.call(some_trio_fn, 1, 2, timeout=5)   # one trio call, awaited
    ...
    await guest.stop()                          # cancels everything, waits for the end

From trio code, `await guest.call_asyncio(async_fn, ...)` runs an asyncio coroutine and
awaits its result; `guest.call_soon_asyncio(fn, ...)` schedules a plain callback on the
asyncio loop (use it to hand received messages to asyncio queues).

Rules kept here: every wait has a timeout, every task has an owner, and nothing trio-side
outlives `stop()`. This module must never import libp2p or grpc.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import outcome
import trio

__all__ = ["GuestStopped", "TrioGuest"]

log = logging.getLogger("rollshare.bridge")

T = TypeVar("T")

# Extra time the asyncio side waits beyond a call's own (trio-enforced) timeout before it
# gives up on a wedged trio run. Normally the trio side times out first.
_BACKSTOP_S = 2.0


class GuestStopped(RuntimeError):
    """The trio guest run is not running (never started, stopped, or crashed)."""


class TrioGuest:
    """A trio run hosted by the running asyncio loop, with calls in both directions."""

    def __init__(self, *, default_timeout: float = 30.0, name: str = "trio-guest") -> None:
        self.default_timeout = default_timeout
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._done: asyncio.Future[outcome.Outcome] | None = None
        self._stopping = False

    # ----------------------------------------------------------------- asyncio side

    @property
    def running(self) -> bool:
        """True between a successful start() and the end of the guest run."""
        return self._nursery is not None and self._done is not None and not self._done.done()

    async def start(
        self,
        async_fn_main: Callable[..., Awaitable[Any]] | None = None,
        *args: Any,
        timeout: float | None = None,
    ) -> Any:
        """Start the trio guest run; optionally start `async_fn_main` in it.

        `async_fn_main` follows trio's `nursery.start` protocol: it must accept a
        `task_status` keyword and call `task_status.started(value)` once it is ready;
        `start` returns that value. The main keeps running until it returns or `stop()`.
        """
        if self._loop is not None:
            raise RuntimeError(f"{self.name} was already started; make a new TrioGuest")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done = loop.create_future()
        ready: asyncio.Future[None] = loop.create_future()

        def done_callback(result: outcome.Outcome) -> None:
            # Runs on the asyncio loop when the trio run has completely finished.
            self._nursery = None
            if not self._done.done():
                self._done.set_result(result)
            if not ready.done():
                ready.set_exception(GuestStopped(f"{self.name} ended during start-up"))
            if isinstance(result, outcome.Error) and not self._stopping:
                log.error("%s crashed: %r", self.name, result.error)

        trio.lowlevel.start_guest_run(
            self._guest_root,
            ready,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            run_sync_soon_not_threadsafe=loop.call_soon,
            done_callback=done_callback,
            # asyncio owns signal.set_wakeup_fd (loop.add_signal_handler); trio must not
            # replace it, or asyncio's signal handlers (and grpc's) stop working.
            host_uses_signal_set_wakeup_fd=True,
        )
        await asyncio.wait_for(asyncio.shield(ready), timeout or self.default_timeout)
        if async_fn_main is None:
            return None
        return await self.start_task(async_fn_main, *args, timeout=timeout)

    async def start_task(
        self, async_fn: Callable[..., Awaitable[Any]], *args: Any, timeout: float | None = None
    ) -> Any:
        """Start a long-lived trio task in the guest's root nursery (`nursery.start`).

        Returns the value the task passes to `task_status.started(...)`. The task runs
        until it returns or `stop()` cancels it.
        """
        nursery = self._require_nursery()
        return await self.call(nursery.start, async_fn, *args, timeout=timeout)

    async def call(
        self, trio_async_fn: Callable[..., Awaitable[T]], *args: Any, timeout: float | None = None
    ) -> T:
        """Run `await trio_async_fn(*args)` in the guest and return its result to asyncio.

        Raises TimeoutError after `timeout` seconds (default: `default_timeout`), the
        function's own exception if it raised, and GuestStopped if the guest stops first.
        Cancelling the awaiting asyncio task cancels the trio call.
        """
        nursery = self._require_nursery()
        assert self._loop is not None and self._token is not None
        timeout = self.default_timeout if timeout is None else timeout
        fut: asyncio.Future[T] = self._loop.create_future()
        scope = trio.CancelScope()

        async def runner() -> None:
            with scope:
                try:
                    with trio.move_on_after(timeout) as deadline:
                        _settle(fut, result=await trio_async_fn(*args))
                except trio.Cancelled:
                    _settle(fut, exc=GuestStopped(
                        f"{self.name} stopped before {_name(trio_async_fn)} finished"))
                    raise
                except Exception as e:  # handed to the asyncio caller, not lost
                    _settle(fut, exc=e)
                    return
                except BaseException as e:
                    _settle(fut, exc=e)
                    raise
                if deadline.cancelled_caught:
                    _settle(fut, exc=TimeoutError(
                        f"{_name(trio_async_fn)} did not finish within {timeout:g} s"))
            if scope.cancelled_caught:  # the asyncio caller went away
                _settle(fut, exc=GuestStopped(f"call to {_name(trio_async_fn)} cancelled"))

        try:
            self._token.run_sync_soon(nursery.start_soon, runner)
        except trio.RunFinishedError:
            raise GuestStopped(f"{self.name} is not running") from None
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout + _BACKSTOP_S)
        except BaseException:
            # Timeout backstop or asyncio-side cancellation: cancel the trio half too.
            self._run_sync_soon(scope.cancel)
            raise

    async def stop(self, timeout: float | None = None) -> None:
        """Cancel every task in the guest and wait until the trio run has finished.

        Idempotent. Raises TimeoutError if trio does not wind down within `timeout`, and
        re-raises the guest's crash if it ended with an error other than cancellation.
        """
        if self._done is None:
            return
        self._stopping = True
        if self._nursery is not None:
            self._run_sync_soon(self._nursery.cancel_scope.cancel)
        result = await asyncio.wait_for(asyncio.shield(self._done), timeout or self.default_timeout)
        if isinstance(result, outcome.Error):
            raise GuestStopped(f"{self.name} ended with an error") from result.error

    async def wait(self) -> None:
        """Wait until the guest run ends by itself; GuestStopped if it crashed.

        Put this in the node's task group so that a dying libp2p side stops the node too.
        """
        if self._done is None:
            raise GuestStopped(f"{self.name} was never started")
        result = await asyncio.shield(self._done)
        if isinstance(result, outcome.Error):
            raise GuestStopped(f"{self.name} ended with an error") from result.error

    # -------------------------------------------------------------------- trio side

    async def call_asyncio(
        self, async_fn: Callable[..., Awaitable[T]], *args: Any, timeout: float | None = None
    ) -> T:
        """From trio: run `await async_fn(*args)` as an asyncio task and return its result.

        The asyncio task is cancelled if this trio call is cancelled or times out
        (trio.TooSlowError), so it never outlives its trio owner.
        """
        assert self._loop is not None, "call_asyncio needs a started TrioGuest"
        timeout = self.default_timeout if timeout is None else timeout
        token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        # Same thread: trio code runs inside asyncio callbacks, so create_task is safe.
        task = self._loop.create_task(async_fn(*args))

        def wake(_: asyncio.Future[Any]) -> None:
            try:
                token.run_sync_soon(finished.set)
            except trio.RunFinishedError:
                pass

        task.add_done_callback(wake)
        try:
            with trio.fail_after(timeout):
                await finished.wait()
        finally:
            if not task.done():
                task.cancel()
        return task.result()

    def call_soon_asyncio(self, fn: Callable[..., Any], *args: Any) -> None:
        """From trio (or any thread): schedule the plain callable `fn(*args)` on asyncio."""
        assert self._loop is not None, "call_soon_asyncio needs a started TrioGuest"
        self._loop.call_soon_threadsafe(fn, *args)

    # ---------------------------------------------------------------------- internal

    async def _guest_root(self, ready: asyncio.Future[None]) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            _settle(ready, result=None)
            await trio.sleep_forever()  # keeps the nursery open until stop() cancels it

    def _require_nursery(self) -> trio.Nursery:
        if not self.running or self._nursery is None:
            raise GuestStopped(f"{self.name} is not running; call start() first")
        return self._nursery

    def _run_sync_soon(self, fn: Callable[[], Any]) -> None:
        if self._token is None:
            return
        try:
            self._token.run_sync_soon(fn)
        except trio.RunFinishedError:
            pass


def _settle(fut: asyncio.Future[Any], *, result: Any = None, exc: BaseException | None = None) -> None:
    """Resolve an asyncio future once; later attempts are ignored (first outcome wins)."""
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
