"""Serve one source LLM over gRPC.

    livefuse-teacher --model PATH_OR_HUB_ID [--config teacher.yaml] [--port 50051] [...]
    python -m teacher_server --model ./tiny-llama --device cpu --port 0 --metrics-port none

Every setting of ``TeacherConfig`` is a flag; a YAML file (--config) gives the same settings and flags
override it. SIGTERM / Ctrl-C drain in-flight requests for ``grace_seconds`` before exiting (status 0). A
backend that dies for good (``BackendDead``, e.g. vLLM's engine process) makes it report NOT_SERVING and
exit with status 1, so that its orchestrator (docker restart policy, Kubernetes) restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import types
import typing

from protos.logs import setup_logging
from teacher_server.backends.base import BackendDead
from teacher_server.config import TeacherConfig, load_config

log = logging.getLogger("livefuse.teacher")
DEAD_GRACE_SECONDS = 1.0  # after the backend died: time for error responses already computed to go out


def _optional(kind: type) -> typing.Callable[[str], object]:
    """argparse type for an ``int | None`` / ``float | None`` field: ``none``, ``null`` or ``off`` mean None."""
    def parse(text: str) -> object:
        return None if text.lower() in ("none", "null", "off") else kind(text)
    parse.__name__ = f"{kind.__name__} or none"  # argparse names it in "invalid ... value"
    return parse


def _flag_type(annotation: object) -> tuple[object, bool]:
    """argparse type for a config field annotation; second item: is it a bool flag."""
    args = typing.get_args(annotation)
    if annotation is bool:
        return None, True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and (int in args or float in args):
        return _optional(int if int in args else float), False
    if typing.get_origin(annotation) is typing.Literal:
        return str, False
    return (annotation if annotation in (int, float) else str), False


def _literal_choices(annotation: object) -> tuple[str, ...] | None:
    """The choices of a ``Literal`` field (or of the ``Literal`` inside ``Literal[...] | None``)."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    inner = [a for a in typing.get_args(annotation) if typing.get_origin(a) is typing.Literal]
    return typing.get_args(inner[0]) if inner else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livefuse-teacher", description=__doc__, argument_default=None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file with TeacherConfig settings (flags override it)")
    for name, field in TeacherConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind, is_bool = _flag_type(field.annotation)
        default = "required" if field.is_required() else f"default: {field.default}"
        help_text = f"{field.description} ({default})".replace("%", "%%")  # argparse formats help with %
        if is_bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            choices = _literal_choices(field.annotation)
            parser.add_argument(flag, dest=name, type=kind, choices=choices, default=argparse.SUPPRESS,
                                help=help_text)
    return parser


async def serve(config: TeacherConfig) -> None:
    """Serves until SIGTERM/SIGINT (drains, returns) or until the backend dies (raises BackendDead)."""
    from teacher_server.server import TeacherServer

    server = TeacherServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    loading = asyncio.create_task(server.load())
    stopping = asyncio.create_task(stop.wait())
    dying = asyncio.create_task(server.dead.wait())
    await asyncio.wait({loading, stopping, dying}, return_when=asyncio.FIRST_COMPLETED)
    failed = loading.exception() if loading.done() else None
    if failed is not None and not isinstance(failed, BackendDead):
        await server.stop(0)
        raise failed
    if failed is None:
        await asyncio.wait({stopping, dying}, return_when=asyncio.FIRST_COMPLETED)
    for task in (loading, stopping, dying):
        task.cancel()
    if server.dead.is_set() or failed is not None:  # only a restart helps: exit non-zero
        await server.stop(DEAD_GRACE_SECONDS)
        raise BackendDead("the backend died (see the log above); exiting so that it can be restarted")
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config")
    try:
        config = load_config(path, args)
    except (ValueError, OSError) as err:
        sys.exit(f"livefuse-teacher: {err}")
    setup_logging(config.log_format, config.log_level)
    log.info("config", extra={"fields": config.model_dump()})
    try:
        asyncio.run(serve(config))
    except (ValueError, OSError, BackendDead) as err:
        log.error(str(err))
        sys.exit(f"livefuse-teacher: {err}")


if __name__ == "__main__":
    main()
