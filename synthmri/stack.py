"""`synthmri up`: the whole service on localhost in one foreground command.

Starts Redis, one Celery worker and the API (synthmri.localstack), prints the URL,
the API key and a curl example, then supervises (synthmri.supervise): a child that
dies is started again with back-off, and only a child that keeps dying right after
starting stops the whole stack, with its log. Ctrl-C / SIGTERM stops everything.
Redis keeps its data in an append-only file under the state directory, so restarting
Redis or `up` itself loses no accepted job. Children run in their own sessions (a
terminal's Ctrl-C reaches only this process, which stops them in order) and, on Linux,
get SIGKILL if this process dies without cleaning up, so no Redis is ever left
running behind it.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from synthmri.cli import CliError, make_parser
from synthmri.localstack import LocalStack, StackError
from synthmri.registry import scan_models
from synthmri.supervise import RestartPolicy, supervise

DEMO_MODEL = "demo"
# `python -m synthmri.cli` would load the CLI twice (as __main__ and as synthmri.cli), and
# then a sub-command's CliError would not be caught as one.
SYNTHMRI_CMD = [sys.executable, "-c", "import sys; from synthmri.cli import main; sys.exit(main())"]


class Stop(BaseException):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) arrived.

    A BaseException, like KeyboardInterrupt, so readiness polls that swallow
    `Exception` cannot swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ----------------------------------------------------------------------------- models
def installed_models(models_dir: Path) -> dict[str, str]:
    """Model name → channel set of the checkpoints the API will serve (the registry's view)."""
    return {name: info.channel_set for name, info in scan_models(models_dir).items()}


def ensure_models(models_dir: Path) -> dict[str, str]:
    """The installed models; with none, train the demo model first (a few minutes on CPU)."""
    models = installed_models(models_dir)
    if models:
        return models
    out = models_dir / DEMO_MODEL
    say(
        f"No model in {models_dir}/ yet: training the demo model into {out}/ "
        "(`synthmri demo-model`, up to ~10 minutes on a laptop CPU; done once)."
    )
    args = ["demo-model", "--out", str(out)]
    code = subprocess.call([*SYNTHMRI_CMD, *args])
    if code != 0 or not (out / "config.json").exists():
        rerun = " ".join(["synthmri", *args])
        raise CliError(f"training the demo model failed (exit code {code}); run `{rerun}` to see why")
    return installed_models(models_dir)


# ----------------------------------------------------------------------------- api key
def resolve_api_key(given: str | None, state_dir: Path) -> tuple[str | None, str]:
    """The key to print and how it was chosen.

    --api-key wins; else keys already set in SYNTHMRI_API_KEYS are used as they are
    (they may be hashed, so none is printed); else a key is generated once and kept in
    `state_dir/api-key`, so the web page's saved key keeps working across restarts.
    """
    if given:
        return given, "from --api-key"
    if os.environ.get("SYNTHMRI_API_KEYS", "").strip():
        return None, "one of the keys in SYNTHMRI_API_KEYS"
    path = state_dir / "api-key"
    if path.exists():
        key = path.read_text().strip()
        if key:
            return key, f"saved in {path}"
    key = secrets.token_urlsafe(18)
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, f"generated, saved in {path}"


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            raise CliError(
                f"port {port} on {host} is in use; choose another with --port P (or --port 0)"
            ) from None


# ----------------------------------------------------------------------------- output
def say(message: str) -> None:
    print(f"synthmri up: {message}", flush=True)


def banner(stack: LocalStack, key: str | None, key_source: str, models: dict[str, str]) -> str:
    url = stack.url
    shown_key = key or "$SYNTHMRI_KEY"
    channels = next(iter(models.values()), "t1ce+seg")
    auth = f'-H "Authorization: Bearer {shown_key}"'
    model_list = ", ".join(f"{name} ({cs})" for name, cs in models.items())
    return "\n".join(
        [
            "",
            f"SynthMRI is up at {url}/",
            f"  web page  {url}/",
            f"  API key   {shown_key}   ({key_source})",
            f"  models    {model_list}",
            f"  logs      {stack.log_dir}/",
            "",
            "Try it (submit a job, wait for it, download its grid and all files):",
            f"  curl -s -X POST {url}/v1/jobs {auth} -H 'Content-Type: application/json' \\",
            f"       -d '{{\"channels\": \"{channels}\", \"count\": 4, \"seed\": 1, "
            f"\"sampler\": \"ddpm\", \"steps\": 250}}'",
            f'  curl -s "{url}/v1/jobs/JOB_ID?wait=60" {auth}',
            f"  curl -s -o grid.png {url}/v1/jobs/JOB_ID/grid.png {auth}",
            f"  curl -s -o job.zip {url}/v1/jobs/JOB_ID/archive.zip {auth}",
            "",
            f"Redis keeps its data in {stack.redis_dir}/; a process that dies is started again.",
            "Press Ctrl-C to stop.",
        ]
    )


# ----------------------------------------------------------------------------- main
def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signum)


def main(argv: list[str]) -> int:
    parser = make_parser("up", "Start Redis, one Celery worker and the API on this machine.")
    parser.add_argument("--port", type=int, default=8000, help="API port; 0 picks a free one (default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--models",
        type=Path,
        default=Path(os.environ.get("SYNTHMRI_MODELS_DIR", "models")),
        help="models directory; the demo model is trained into it when it holds none "
        "(default $SYNTHMRI_MODELS_DIR or ./models)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=Path(os.environ.get("SYNTHMRI_RESULTS_DIR", "var/results")),
        help="job outputs directory (default $SYNTHMRI_RESULTS_DIR or ./var/results)",
    )
    parser.add_argument(
        "--api-key", help="API key to accept (default: SYNTHMRI_API_KEYS, else a generated one)"
    )
    parser.add_argument(
        "--state-dir", type=Path, default=Path("var/up"),
        help="logs, Redis data and the generated key (default ./var/up)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port} is not a TCP port (0..65535)")
    if args.port:
        check_port_free(args.host, args.port)

    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    stack: LocalStack | None = None
    try:
        models = ensure_models(args.models.resolve())
        key, key_source = resolve_api_key(args.api_key, args.state_dir)
        extra_env = {"SYNTHMRI_API_KEYS": key or os.environ["SYNTHMRI_API_KEYS"]}
        stack = LocalStack(
            die_with_parent=True,
            models_dir=args.models,
            results_dir=args.results,
            workdir=args.state_dir,
            api_key=key,
            env=extra_env,
            host=args.host,
            api_port=args.port or None,
        )
        for d in (stack.models_dir, stack.results_dir, stack.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        say(f"starting Redis ({stack.redis_url}) ...")
        stack.start_redis()
        say("starting the Celery worker (loads torch; first start can take a while) ...")
        stack.start_worker()
        say("starting the API ...")
        stack.start_api()
        say(f"all three up in {time.monotonic() - started:.1f} s")
        print(banner(stack, key, key_source, models), flush=True)
        supervise(stack, say, RestartPolicy())
        return 1  # supervise() only returns by raising
    except Stop as stop:
        say(f"{stop} received, stopping ...")
        return 0
    except StackError as e:
        print(f"synthmri up: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        # Stop signals during the shutdown itself must not cut it short.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        if stack is not None:
            stack.stop()
            say("stopped Redis, worker and API")
        for s, handler in previous.items():
            signal.signal(s, handler)
