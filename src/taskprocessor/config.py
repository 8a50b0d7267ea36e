"""Settings of the command line and worker processes, and where each one comes from.

A setting is read from the first of these that gives it (highest precedence first):

1. a command-line option (``--concurrency 8``), or a keyword argument of
   `load_settings` (``overrides``);
2. an environment variable ``TASKPROCESSOR_<SETTING>`` (``TASKPROCESSOR_CONCURRENCY=8``);
   an empty one counts as unset;
3. a TOML file: the one named by ``--config FILE`` or ``TASKPROCESSOR_CONFIG``, else
   the ``[tool.taskprocessor]`` table of ``./pyproject.toml`` when there is one. A file
   given explicitly holds its settings at the top level, or in a
   ``[tool.taskprocessor]`` table (so a pyproject.toml elsewhere works too);
4. the default.

Each value is checked where it is read: a bad one raises `ConfigurationError` naming
the setting, where it came from (option, environment variable, or file and key) and
what is accepted. A key of the TOML table that is not a setting is an error too, so a
typo never passes silently::

    # pyproject.toml
    [tool.taskprocessor]
    app = "myproject.tasks:app"
    broker_url = "redis://cache:6379/0"
    queues = ["default", "emails"]
    concurrency = 128
    grace = 60

==============  ==============================  ====================  =====================
setting         environment variable            command-line option   default
==============  ==============================  ====================  =====================
app             TASKPROCESSOR_APP               MODULE:ATTRIBUTE      none
broker_url      TASKPROCESSOR_BROKER_URL        ``--broker``          the app's broker
queues          TASKPROCESSOR_QUEUES            ``--queues``          the broker's queues
concurrency     TASKPROCESSOR_CONCURRENCY       ``--concurrency``     64 (or autoscale MIN)
autoscale       TASKPROCESSOR_AUTOSCALE         ``--autoscale``       off
grace           TASKPROCESSOR_GRACE             ``--grace``           30.0 seconds
metrics_port    TASKPROCESSOR_METRICS_PORT      ``--metrics-port``    no endpoint
metrics_addr    TASKPROCESSOR_METRICS_ADDR      ``--metrics-addr``    127.0.0.1
log_level       TASKPROCESSOR_LOG_LEVEL         ``--log-level``       info (worker), error
loop            TASKPROCESSOR_LOOP              ``--loop``            auto
==============  ==============================  ====================  =====================

``loop`` is the worker's event loop: ``uvloop`` (the ``uvloop`` extra), ``asyncio`` (the
standard library's), or ``auto``, uvloop when it is installed and asyncio otherwise.

Example:
    >>> settings = load_settings({"concurrency": 8}, environ={}, cwd="/nonexistent")
    >>> settings.concurrency, settings.grace, settings.source("concurrency")
    (8, 30.0, 'keyword argument concurrency')
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, final
from urllib.parse import urlsplit, urlunsplit

from taskprocessor.engine.autoscaler import Autoscale
from taskprocessor.errors import ConfigurationError

__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "LOOPS",
    "PRECEDENCE",
    "SETTINGS",
    "SettingSpec",
    "Settings",
    "load_settings",
]

ENV_PREFIX: Final = "TASKPROCESSOR_"
"""Environment variables ``TASKPROCESSOR_<SETTING>`` set settings (see the module docs)."""

CONFIG_ENV: Final = "TASKPROCESSOR_CONFIG"
"""Environment variable naming a TOML file of settings (as ``--config`` does)."""

PRECEDENCE: Final = (
    "Settings come from, highest first: command-line options; environment variables "
    f"{ENV_PREFIX}<SETTING> ({ENV_PREFIX}BROKER_URL, {ENV_PREFIX}QUEUES, ...); the TOML "
    f"file named by --config or {CONFIG_ENV}, else the [tool.taskprocessor] table of "
    "./pyproject.toml; then the defaults. Unknown keys in the TOML table are an error."
)
"""The precedence of settings, in one paragraph (the command line's ``--help`` shows it)."""

LOOPS: Final = ("auto", "asyncio", "uvloop")
"""The values of the ``loop`` setting: the worker's event loop (see `taskprocessor.worker`)."""

_TABLE: Final = "[tool.taskprocessor]"
_LOG_LEVELS: Final = ("debug", "info", "warning", "error")


class _Invalid(Exception):
    """A value a parser refuses (the caller says which setting and where from)."""


# -- parsers: a raw value (a string from the environment, any TOML value, or a typed
# keyword argument) to the setting's type; they raise _Invalid ------------------------


def _text(value: object) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise _Invalid
    return value


def _integer(value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid
    if value < low or (high is not None and value > high):
        raise _Invalid
    return value


def _parse_app(value: object) -> str:
    return _text(value)


def _parse_broker_url(value: object) -> str:
    url = _text(value)
    if urlsplit(url).scheme not in ("memory", "redis", "rediss"):
        raise _Invalid
    return url


def _parse_queues(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        items: list[object] = [q.strip() for q in value.split(",")]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise _Invalid
    for name in items:
        if not isinstance(name, str) or not name or any(c in name for c in "{}, \t\n"):
            raise _Invalid
    if not items:
        raise _Invalid
    return tuple(dict.fromkeys(str(q) for q in items))


def _parse_concurrency(value: object) -> int:
    return _integer(value, 1)


def _parse_autoscale(value: object) -> Autoscale:
    if isinstance(value, Autoscale):
        return value
    if isinstance(value, str):
        low, sep, high = value.partition(":")
        if not sep:
            raise _Invalid
        value = [low, high]
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise _Invalid
    low_n, high_n = _integer(value[0], 1), _integer(value[1], 1)
    if low_n > high_n:
        raise _Invalid
    return Autoscale(min_workers=low_n, max_workers=high_n)


def _parse_grace(value: object) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _Invalid from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid
    if not 0 <= value < math.inf:
        raise _Invalid
    return float(value)


def _parse_metrics_port(value: object) -> int:
    return _integer(value, 0, 65535)


def _parse_metrics_addr(value: object) -> str:
    return _text(value)


def _parse_log_level(value: object) -> str:
    if not isinstance(value, str) or value.lower() not in _LOG_LEVELS:
        raise _Invalid
    return value.lower()


def _parse_loop(value: object) -> str:
    if not isinstance(value, str) or value.lower() not in LOOPS:
        raise _Invalid
    return value.lower()


@final
@dataclass(frozen=True, slots=True)
class SettingSpec:
    """One setting: its names at each source, its default and what it accepts.

    Attributes:
        name: The field of `Settings`, and the key in the TOML table.
        flag: The command-line option (or argument) that sets it.
        accepted: What it accepts, in words.
        default: The default, in words.
        parse: Turns a raw value into the setting's type, or raises.
    """

    name: str
    flag: str
    accepted: str
    default: str
    parse: Callable[[object], object]

    @property
    def env(self) -> str:
        """The environment variable that sets it."""
        return f"{ENV_PREFIX}{self.name.upper()}"


SETTINGS: Final[tuple[SettingSpec, ...]] = (
    SettingSpec(
        "app",
        "MODULE:ATTRIBUTE",
        "'package.module:attribute' naming a TaskProcessor",
        "none (worker and submit need one)",
        _parse_app,
    ),
    SettingSpec(
        "broker_url",
        "--broker",
        "a broker URL: redis://[:password@]host:6379/0, rediss://... or memory://",
        "the app's broker",
        _parse_broker_url,
    ),
    SettingSpec(
        "queues",
        "--queues",
        "queue names, a list or comma-separated, without braces, commas or spaces",
        "the broker's queues",
        _parse_queues,
    ),
    SettingSpec(
        "concurrency",
        "--concurrency",
        "an integer >= 1",
        "64, or the autoscale minimum",
        _parse_concurrency,
    ),
    SettingSpec(
        "autoscale",
        "--autoscale",
        "'MIN:MAX' (or [MIN, MAX]) with 1 <= MIN <= MAX",
        "off",
        _parse_autoscale,
    ),
    SettingSpec("grace", "--grace", "seconds >= 0", "30", _parse_grace),
    SettingSpec(
        "metrics_port",
        "--metrics-port",
        "a port from 0 to 65535 (0: any free one)",
        "no metrics endpoint",
        _parse_metrics_port,
    ),
    SettingSpec(
        "metrics_addr",
        "--metrics-addr",
        "an address to bind, such as 127.0.0.1 or 0.0.0.0",
        "127.0.0.1",
        _parse_metrics_addr,
    ),
    SettingSpec(
        "log_level",
        "--log-level",
        "one of debug, info, warning, error",
        "info for worker, error for the other commands",
        _parse_log_level,
    ),
    SettingSpec(
        "loop",
        "--loop",
        "one of auto, asyncio, uvloop",
        "auto: uvloop when installed, else asyncio",
        _parse_loop,
    ),
)
_SPECS: Final = {spec.name: spec for spec in SETTINGS}


@final
@dataclass(frozen=True, slots=True)
class Settings:
    """The settings of a command-line run or a worker process, checked.

    Build one with `load_settings` (which merges every source), or directly with
    keyword arguments (each value is checked the same way). Raw values are accepted
    where a source gives them: ``queues="a,b"``, ``autoscale="4:128"``, ``grace="30"``.

    Attributes:
        app: The TaskProcessor to load, ``package.module:attribute``; None if not set.
        broker_url: A broker URL replacing the app's broker; None keeps the app's.
        queues: The queues to consume (or inspect), earlier ones first; None for the
            broker's.
        concurrency: Tasks running at once per worker process; None for the default.
        autoscale: Resize the pool with the backlog within these bounds; None for off.
        grace: Seconds running tasks get to finish after a stop signal.
        metrics_port: Serve Prometheus metrics on this port; None for no endpoint.
        metrics_addr: The address the metrics endpoint binds.
        log_level: ``debug``, ``info``, ``warning`` or ``error``; None for the
            command's default.
        loop: The worker's event loop: ``auto`` (uvloop when installed, else
            asyncio), ``asyncio`` or ``uvloop``. Whether uvloop is installed is checked
            when the worker starts (`taskprocessor.worker.WorkerOptions`).
        sources: Where each setting that is not a default came from, by name.
        warnings: Things worth telling the user that are not errors (an environment
            variable that looks like a misspelt setting).

    Raises:
        ConfigurationError: A value outside its range, naming where it came from.
    """

    app: str | None = None
    broker_url: str | None = None
    queues: tuple[str, ...] | None = None
    concurrency: int | None = None
    autoscale: Autoscale | None = None
    grace: float = 30.0
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    log_level: str | None = None
    loop: str = "auto"
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    warnings: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))
        for spec in SETTINGS:
            value = getattr(self, spec.name)
            if value is None and _DEFAULTS[spec.name] is None:
                continue
            object.__setattr__(self, spec.name, _check(spec, value, self.source(spec.name)))
        concurrency, autoscale = self.concurrency, self.autoscale
        if (
            concurrency is not None
            and autoscale is not None
            and not autoscale.min_workers <= concurrency <= autoscale.max_workers
        ):
            raise ConfigurationError(
                "concurrency",
                concurrency,
                f"the initial pool size within the autoscale bounds "
                f"{autoscale.min_workers}:{autoscale.max_workers} (concurrency from "
                f"{self.source('concurrency')}, autoscale from {self.source('autoscale')})",
            )

    def source(self, name: str) -> str:
        """Say where setting ``name`` came from: an option, a variable, a file and key."""
        source = self.sources.get(name)
        if source is not None:
            return source
        if name in _SPECS and getattr(self, name) == _DEFAULTS[name]:
            return "the default"
        return f"keyword argument {name}"


_DEFAULTS: Final[dict[str, object]] = {
    f.name: f.default for f in fields(Settings) if f.name in _SPECS
}


def _check(spec: SettingSpec, value: object, source: str) -> Any:
    try:
        return spec.parse(value)
    except _Invalid:
        shown = _masked(value) if spec.name == "broker_url" else value
        raise ConfigurationError(spec.name, shown, f"{spec.accepted} (from {source})") from None


def _masked(value: object) -> object:
    """A URL with its password hidden (an error message must never show one)."""
    if not isinstance(value, str):
        return value
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:
        return "<a malformed URL>"
    if password is None:
        return value
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:****@{netloc}"))


def load_settings(
    overrides: Mapping[str, object] | None = None,
    *,
    origins: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Settings:
    """Merge the settings of every source, highest precedence first (see the module docs).

    Args:
        overrides: Values that beat every other source, by setting name (the
            command line's options); None values count as not given.
        origins: Where each override came from, for messages (``"--concurrency"``);
            ``"keyword argument <name>"`` by default.
        environ: The environment to read (default: ``os.environ``).
        config_file: A TOML file of settings (``--config``); by default the one named
            by ``TASKPROCESSOR_CONFIG``, else ``[tool.taskprocessor]`` of
            ``pyproject.toml`` in ``cwd``.
        cwd: Where to look for ``pyproject.toml`` (default: the current directory).

    Returns:
        The checked settings; ``sources`` says where each came from.

    Raises:
        ConfigurationError: A value is out of range, a key of the TOML table is not a
            setting, or the TOML file cannot be read.
    """
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for name, (value, source) in _from_file(config_file, env, cwd).items():
        values[name], sources[name] = value, source
    for spec in SETTINGS:
        raw = env.get(spec.env)
        if raw:
            values[spec.name], sources[spec.name] = raw, f"environment variable {spec.env}"
    for name, value in (overrides or {}).items():
        if name not in _SPECS:
            raise ConfigurationError(name, value, f"one of the settings {_known()}")
        if value is not None:
            values[name] = value
            sources[name] = (origins or {}).get(name, f"keyword argument {name}")
    return Settings(**values, sources=sources, warnings=_misspelt_variables(env))  # type: ignore[arg-type]


def _known() -> str:
    return ", ".join(_SPECS)


def _from_file(
    config_file: str | os.PathLike[str] | None,
    env: Mapping[str, str],
    cwd: str | os.PathLike[str] | None,
) -> dict[str, tuple[object, str]]:
    """Read the TOML source: (value, where it came from) by setting name."""
    explicit = config_file is not None or bool(env.get(CONFIG_ENV))
    if config_file is not None:
        path, given_by = Path(config_file), "--config"
    elif env.get(CONFIG_ENV):
        path, given_by = Path(env[CONFIG_ENV]), f"environment variable {CONFIG_ENV}"
    else:
        path, given_by = Path(cwd if cwd is not None else Path.cwd()) / "pyproject.toml", ""
        if not path.is_file():
            return {}
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f" (given by {given_by})" if given_by else ""
        raise ConfigurationError(
            "config", str(path), f"a readable TOML file{where}: {reason}"
        ) from None
    tool = document.get("tool")
    if isinstance(tool, dict):  # a pyproject.toml: its [tool.taskprocessor] table
        table = tool.get("taskprocessor")
        if table is None:
            if not explicit:
                return {}
            raise ConfigurationError(
                "config",
                str(path),
                f"a TOML file with settings at its top level or in a {_TABLE} table "
                f"(given by {given_by})",
            )
        where = f"{path} {_TABLE}"
    else:
        table, where = document, str(path)
    if not isinstance(table, dict):
        raise ConfigurationError("config", str(path), f"{_TABLE} to be a table of settings")
    unknown = [key for key in table if key not in _SPECS]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key.replace("-", "_"), _SPECS, n=1)
            hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise ConfigurationError(
            ", ".join(unknown),
            table[unknown[0]] if len(unknown) == 1 else tuple(table[k] for k in unknown),
            f"setting names only in {where}: {', '.join(hints)} "
            f"{'is not a setting' if len(unknown) == 1 else 'are not settings'}; the settings "
            f"are {_known()}",
        )
    return {key: (value, f"{where}, key {key}") for key, value in table.items()}


def _misspelt_variables(env: Mapping[str, str]) -> tuple[str, ...]:
    known = {spec.env for spec in SETTINGS} | {CONFIG_ENV}
    notes = []
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.85)
            if close:
                notes.append(
                    f"the environment variable {name} is not a setting and is ignored: "
                    f"did you mean {close[0]}?"
                )
    return tuple(notes)
