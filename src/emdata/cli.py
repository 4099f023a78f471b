"""The command line (``emdata`` / ``python -m emdata``): thin commands, one error boundary.

Each command parses arguments, calls one function of the library and prints its result. Every
exception that escapes a command becomes one line ``emdata: error: ...`` and a non-zero exit code:
an EmdataError as its own message (which names the dataset), anything else (a file-system error,
a bug) prefixed by the command's name; set ``EMDATA_DEBUG=1`` to see the traceback instead.
Ctrl-C exits 130 with one line. Each command resolves its dataset once (:func:`emdata.sources.dataset.resolve_dataset`)
and hands it down. Commands import their stage when they run (the one place an emdata module is
imported inside a function), so ``--help`` and a typo answer without loading numpy, h5py or requests.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional

try:
    import click
    import typer
except ModuleNotFoundError as exc:  # the light, read-only install: the commands come with the extra
    raise SystemExit(f"emdata: error: the command line needs {exc.name}, which the light install leaves out; "
                     f"pip install 'emdata[pipeline]'") from None

from emdata.errors import ConfigError, EmdataError
from emdata.params.config import Config, load_config
from emdata.sources.dataset import Dataset, registered_kinds, resolve_all, resolve_dataset

app = typer.Typer(
    help="Public 3D EM volumes -> versioned, ML-ready HDF5. Stages of dvc.yaml call these commands.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state: dict = {"root": None, "command": None}


@app.callback()
def _main(
    ctx: typer.Context,
    project: Optional[Path] = typer.Option(None, "--project", "-C", help="Repository folder (default: nearest params.yaml)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only."),
) -> None:
    # Our own messages at the chosen level; other libraries' (tifffile, dvc...) only with -v,
    # since every error we raise already carries its cause in one line.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("emdata: %(message)s"))
    ours = logging.getLogger("emdata")
    ours.handlers[:] = [handler]
    ours.propagate = False
    ours.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.CRITICAL, stream=sys.stderr,
                        format="%(name)s: %(message)s")
    _state["root"] = project
    _state["command"] = ctx.invoked_subcommand


def _config() -> Config:
    return load_config(_state["root"])


def _size(n: Optional[int]) -> str:
    from emdata.stages.summarize import human_bytes

    return "-" if n is None else human_bytes(n)


def _problems(resolved: dict[str, Dataset | ConfigError]) -> dict[str, ConfigError | None]:
    return {key: ds if isinstance(ds, ConfigError) else None for key, ds in resolved.items()}


@app.command("list")
def list_datasets() -> None:
    """Datasets in params.yaml and what exists locally (fetched, normalized, sizes)."""
    from emdata.stages.fetch import dataset_state

    cfg = _config()
    resolved = resolve_all(cfg.datasets, cfg)
    problems = _problems(resolved)
    typer.echo(f"{'dataset':<31} {'kind':<12} {'fetched':<8} {'raw':>10} {'normalized':<11} {'hdf5':>10}")
    for key, ds in resolved.items():
        if isinstance(ds, ConfigError):
            typer.echo(f"{key!r:<31} {cfg.datasets.kind_of(key) or '?':<12} invalid: {_one_line(ds)}")
            continue
        s = dataset_state(ds)
        typer.echo(f"{key:<31} {s['kind']:<12} {'yes' if s['fetched'] else 'no':<8} {_size(s['raw_bytes']):>10} "
                   f"{'yes' if s['normalized'] else 'no':<11} {_size(s['h5_bytes']):>10}")
    optional = _problems(resolve_all(cfg.optional, cfg))
    for key, problem in optional.items():
        state = ("optional: move it under datasets: in params.yaml once you have its files" if problem is None
                 else f"optional, invalid: {_one_line(problem)}")
        typer.echo(f"{key:<31} {cfg.optional.kind_of(key) or '?':<12} {state}")
    problems.update({f"optional_datasets.{key}": problem for key, problem in optional.items()})
    bad = [key for key, problem in problems.items() if problem is not None]
    if bad:
        raise ConfigError(f"{len(bad)} dataset(s) in params.yaml are invalid: {', '.join(map(repr, bad))}; see above")


@app.command()
def check() -> None:
    """Validate every dataset in params.yaml and the code fingerprints dvc.yaml depends on."""
    from emdata.stages import codedeps

    cfg = _config()
    problems = _problems(resolve_all(cfg.datasets, cfg))
    for key, problem in problems.items():
        typer.echo(f"{'ok     ' if problem is None else 'invalid'} {key}" + ("" if problem is None else f": {_one_line(problem)}"))
    optional = _problems(resolve_all(cfg.optional, cfg))
    for key, problem in optional.items():
        typer.echo(f"ok      {key} (optional: not in the pipeline)" if problem is None
                   else f"invalid {key} (optional): {_one_line(problem)}")
    problems.update({f"optional_datasets.{key}": problem for key, problem in optional.items()})
    stale = codedeps.stale(cfg.root, registered_kinds(cfg))
    for path in stale:
        typer.echo(f"stale   {path}: run `python -m emdata code-deps --write`")
    bad = [key for key, problem in problems.items() if problem is not None]
    if bad or stale:
        raise ConfigError(f"{len(bad)} invalid dataset(s), {len(stale)} stale code fingerprint(s)")
    typer.echo(f"all {len(problems)} dataset(s) valid; code fingerprints current")


@app.command("code-deps")
def code_deps(write: bool = typer.Option(False, "--write", help="Rewrite the stale fingerprint files.")) -> None:
    """Fingerprints of the code that decides each kind's bytes (pipeline/code/, used by dvc.yaml)."""
    from emdata.stages import codedeps

    cfg = _config()
    kinds = registered_kinds(cfg)
    if write:
        for path in codedeps.write(cfg.root, kinds):
            typer.echo(f"wrote {path.relative_to(cfg.root)}")
        return
    stale = codedeps.stale(cfg.root, kinds)
    for path in stale:
        typer.echo(f"stale {path}")
    if stale:
        raise ConfigError(f"{len(stale)} stale code fingerprint(s); run `python -m emdata code-deps --write`")


@app.command()
def inputs() -> None:
    """Write data/inputs/<dataset>.json: the state of sources DVC cannot see (local imports)."""
    from emdata.stages.inputs import write_inputs

    changed = write_inputs(_config())
    for key in sorted(k for k, c in changed.items() if c):
        typer.echo(f"{key}: source inputs changed")
    typer.echo(f"inputs: {sum(changed.values())} of {len(changed)} dataset(s) changed")


@app.command()
def plan(dataset: str = typer.Argument(..., help="Dataset key in params.yaml.")) -> None:
    """What `fetch` would transfer: files (or chunk objects), bytes and requests; downloads no data."""
    from emdata.stages.fetch import plan_dataset, plan_notes

    cfg = _config()
    plans = plan_dataset(cfg, dataset)
    total = 0
    for p in plans:
        typer.echo(f"{p.state:<7} {p.name:<34} {_size(p.size):>10} to transfer {_size(p.to_transfer):>10} "
                   f"requests {p.requests:>2}  {p.url}")
        total += p.to_transfer or 0
    unknown = any(p.to_transfer is None for p in plans)
    typer.echo(f"{dataset}: {sum(p.files for p in plans)} file(s), {_size(total)}{' + unknown sizes' if unknown else ''} "
               f"to transfer, about {sum(p.requests for p in plans)} request(s) without retries")
    for line in plan_notes(cfg, dataset):
        typer.echo(line)


@app.command()
def fetch(dataset: str = typer.Argument(..., help="Dataset key in params.yaml.")) -> None:
    """Download a dataset's source files into data/raw/<dataset> (resumable, verified, atomic)."""
    from emdata.stages.fetch import fetch_dataset

    result = fetch_dataset(_config(), dataset)
    typer.echo(f"{dataset}: {'up to date' if result.up_to_date else 'fetched'} in {result.raw_dir}")


@app.command()
def normalize(
    dataset: str = typer.Argument(..., help="Dataset key in params.yaml."),
    scheduler: Optional[str] = typer.Option(
        None, "--scheduler", envvar="EMDATA_SCHEDULER",
        help="Dask distributed scheduler address (e.g. tcp://host:8786): workers read and encode tiles, this "
             "process writes; the file is byte-identical. Env: EMDATA_SCHEDULER."),
) -> None:
    """Convert data/raw/<dataset> into data/processed/<dataset>.h5 and its metadata record."""
    from emdata.stages.normalize.volume import normalize_dataset

    cfg = _config()
    out = normalize_dataset(cfg, dataset, scheduler=scheduler or None)
    typer.echo(f"{dataset}: wrote {out} and {cfg.record_path(dataset)}")


@app.command()
def summarize() -> None:
    """Write data/metadata.csv, METADATA_SUMMARY.md and thumbnails from the metadata records."""
    from emdata.stages.summarize import summarize as summarize_all

    for path in summarize_all(_config()):
        typer.echo(f"wrote {path}")


@app.command()
def info(dataset: str = typer.Argument(..., help="Dataset key in params.yaml."),
         as_json: bool = typer.Option(False, "--json", help="Print the whole metadata record as JSON.")) -> None:
    """Describe a dataset: its record if normalized, else its configuration and local state."""
    from emdata.h5.metadata import read_record
    from emdata.stages.fetch import dataset_state

    cfg = _config()
    ds = resolve_dataset(cfg, dataset)
    if not ds.paths.record.is_file():
        state = dataset_state(ds)
        typer.echo(json.dumps({"title": ds.title, "source": ds.source.to_dict(), **state}, indent=1))
        return
    record = read_record(cfg, dataset)
    if as_json:
        typer.echo(json.dumps(record, indent=1, sort_keys=True))
        return
    if record.get("layout") == "collection":
        roles = ", ".join(f"{k} ({v['count']})" for k, v in record["roles"].items())
        typer.echo(f"{dataset}: {record['title']}")
        typer.echo(f"  collection of {record['n_images']} images, {len(record['arrays'])} arrays: {roles}")
        typer.echo(f"  compression {record['compression']}, {_size(record['bytes_on_disk'])}; licence {record['license']}")
        typer.echo(f"  file sha256 {record['file_sha256']}")
        return
    stats = record["statistics"]
    typer.echo(f"{dataset}: {record['title']}")
    typer.echo(f"  shape (z,y,x) {record['shape']} {record['dtype']}, voxel {record['voxel_size_nm']} nm, "
               f"extent {record['extent_nm']} nm")
    typer.echo(f"  values min {stats['min']:g} max {stats['max']:g} mean {stats['mean']:.3f} std {stats['std']:.3f}")
    typer.echo(f"  chunks {record['chunks']} compression {record['compression']}, {_size(record['bytes_on_disk'])}")
    typer.echo(f"  labels {', '.join(record['labels']) or '-'}; licence {record['license']}")
    typer.echo(f"  file sha256 {record['file_sha256']}")


@app.command()
def verify(dataset: str = typer.Argument(..., help="Dataset key in params.yaml.")) -> None:
    """Re-hash the fetched raw files (if present), the HDF5 file and its voxels against their records."""
    from emdata.stages.fetch import verify_dataset

    for what, digest in verify_dataset(_config(), dataset, raw=True):
        typer.echo(f"ok  {what}  {digest}")


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, help="Where to build the demo (default: a temporary folder)."),
    keep: bool = typer.Option(False, help="Keep the demo folder and print its path."),
) -> None:
    """The whole job offline: replicas, dvc repro, push to a local S3, fresh clone, pull, verify."""
    from emdata.testing.demo import run_demo

    run_demo(_config().root, workdir=workdir, keep=keep)


def _one_line(text: object) -> str:
    """An error message as one line: control characters (a newline in a key, HDF5's own text) escaped."""
    return " ".join(str(text).replace("\r", " ").split("\n")).replace("\t", " ").strip()


def _click_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage/parameter errors, aborts) of click and of the click that newer Typer vendors."""
    usage, aborts = [click.ClickException], [click.Abort]
    try:
        from typer import _click as vendored  # type: ignore[attr-defined]

        usage.append(vendored.exceptions.ClickException)
        aborts.append(vendored.exceptions.Abort)
    except (ImportError, AttributeError):
        pass
    return tuple(usage), tuple(aborts)


def _debug() -> bool:
    """EMDATA_DEBUG set to anything but empty, 0, false, no or off: show tracebacks."""
    return os.environ.get("EMDATA_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def _fail(text: str, code: int) -> None:
    typer.echo(f"emdata: error: {_one_line(text)}", err=True)
    sys.exit(code)


MESSAGE_MAX = 400  # characters of an unexpected exception's text shown (an error is one readable line)


def _interrupted(signum: int, frame: object) -> None:
    """Ctrl-C as Python's default handler does it, remembered: Typer turns it into a silent exit 130."""
    _state["interrupted"] = True
    raise KeyboardInterrupt


INTERRUPTED = "emdata: interrupted; partial downloads are kept and resume on the next run"


def main() -> None:
    usage, aborts = _click_errors()
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when Ctrl-C is ignored (nohup)
        signal.signal(signal.SIGINT, _interrupted)
    try:
        code = app(standalone_mode=False)
        if _state.get("interrupted"):
            raise KeyboardInterrupt
    except usage as exc:
        # One line, click's own wording, and the command to get help.
        _fail(f"{exc.format_message().rstrip('.')}; see `emdata --help`", getattr(exc, "exit_code", 2) or 2)
    except (*aborts, KeyboardInterrupt):
        typer.echo(INTERRUPTED, err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the one boundary: every error is one line
        if _debug():
            raise
        _fail(*_describe(exc))
    sys.exit(code if isinstance(code, int) else 0)


def _describe(exc: Exception) -> tuple[str, int]:
    """The error line (without ``emdata: error: ``) and exit code of an exception that escaped a command."""
    if isinstance(exc, EmdataError):  # its message names the dataset, the place and what to do
        return str(exc), exc.exit_code
    command = _state.get("command") or "emdata"
    if isinstance(exc, OSError):  # a file-system failure nothing below turned into an EmdataError
        where = f"{exc.filename}: " if exc.filename else ""
        hint = "free some disk space and run again" if exc.errno == errno.ENOSPC else "check the path and permissions"
        return f"{command}: {where}{exc.strerror or exc}; {hint}", 10
    text = _one_line(exc)
    text = text if len(text) <= MESSAGE_MAX else text[:MESSAGE_MAX - 3] + "..."
    return (f"{command}: unexpected {type(exc).__name__}" + (f": {text}" if text else "")
            + "; this is a bug in emdata: run again with EMDATA_DEBUG=1 to see the traceback, and report it"), 1
