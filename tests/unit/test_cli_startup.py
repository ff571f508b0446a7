"""What `drover`'s start-up loads, and that its short cuts change nothing a user sees.

No timings here (bench/cli_startup.py measures them): these are the guarantees the speed rests
on. Each import check runs in a fresh interpreter, as a `drover` command does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from tests.support.cli import CLI_TIMEOUT_S

HEAVY = ("celery", "kombu", "libvirt", "redbeat", "flower", "tornado", "prometheus_client")


def loaded_after(code: str) -> set[str]:
    """The top-level packages in sys.modules after running `code` in a new interpreter."""
    tops = "sorted({m.split('.')[0] for m in sys.modules})"
    return set(json.loads(probe(f"{code}\nimport json, sys\nprint(json.dumps({tops}))")))


def test_importing_the_cli_loads_no_celery_libvirt_or_redis() -> None:
    loaded = loaded_after("import cli.main, producer.cli")
    assert not loaded & {*HEAVY, "redis", "pydantic", "structlog", "rich"}


def test_help_loads_only_what_it_shows() -> None:
    code = (
        "import sys\nsys.argv = ['drover', '--help']\nfrom cli.main import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass"
    )
    loaded = loaded_after(code)
    assert not loaded & {*HEAVY, "redis", "pydantic", "structlog", "markdown_it", "pygments"}


def test_the_python_api_imports_no_worker_logging() -> None:
    """A producer signs and publishes; structlog (and the Rich traceback and pygments it
    brings) is the worker's."""
    assert not loaded_after("import producer.api") & {"structlog", "libvirt", "pygments"}


def test_the_outlined_app_shows_the_same_help_and_refusals() -> None:
    """cli/outline.py builds the commands not on the line from stand-ins: the root's help
    and an unknown command's refusal are the same as the whole app's."""
    from cli.main import full_app
    from cli.outline import outlined

    runner = CliRunner()
    for args in (["--help"], ["jbos"], ["lab", "--help"], ["schedule", "add", "--help"]):
        whole = runner.invoke(full_app(), args)
        light = runner.invoke(outlined(full_app(), args), args)
        assert (light.exit_code, light.output) == (whole.exit_code, whole.output), args


def test_help_renderer_stand_ins_load_the_real_classes_when_used() -> None:
    """cli/help_render.py imports Typer's renderer without rich.markdown and rich.traceback;
    a Markdown help or a pretty traceback still gets Rich's own class."""
    code = (
        "from cli import help_render\nhelp_render.load()\nimport sys\n"
        "from typer import rich_utils\n"
        "assert 'rich.markdown' not in sys.modules and 'rich.traceback' not in sys.modules\n"
        "from rich.markdown import Markdown\n"
        "assert type(rich_utils.Markdown('*x*')) is Markdown\n"
        "try:\n    raise ValueError('x')\nexcept ValueError as exc:\n"
        "    tb = rich_utils.Traceback.from_exception(type(exc), exc, exc.__traceback__)\n"
        "from rich.traceback import Traceback\nassert type(tb) is Traceback"
    )
    assert "rich" in loaded_after(code)


def test_redis_asyncio_is_loaded_only_when_used() -> None:
    """cli/deferred_imports.py: redis-py's package imports its asyncio client up front; a
    command that reads Redis does not load it, and code that uses it gets the real one."""
    code = (
        "import sys\nfrom cli.deferred_imports import defer_all\ndefer_all()\n"
        "import redis\nfrom redis import asyncio as aio\n"
        "assert 'redis.asyncio.client' not in sys.modules, 'loaded up front'\n"
        "import redis.asyncio.client as real\n"
        "assert aio.Redis is real.Redis and aio.Sentinel.__module__ == 'redis.asyncio.sentinel'\n"
        "print('ok')"
    )
    assert probe(code) == "ok"


def test_the_command_line_defers_redis_asyncio(config: Path) -> None:
    """`drover jobs` run where it is typed reads Redis (the test server) and lists the jobs
    without loading redis-py's asyncio client."""
    code = (
        f"import sys\nsys.argv = ['drover', '--config', {str(config)!r}, 'jobs', '--json']\n"
        "import os\nos.environ['DROVER_CLI_SERVER'] = 'off'\n"
        "from cli.launch import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print('redis.client' in sys.modules, 'redis.asyncio.client' in sys.modules)"
    )
    assert probe(code) == "True False"


def probe(code: str) -> str:
    """The last line `code` prints, run in a new interpreter with no drover config around."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DROVER_")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
        env=env,
    )
    return done.stdout.strip().splitlines()[-1]


def test_a_job_command_collects_garbage_again_once_its_api_is_built() -> None:
    """main() stops collection for the start-up; `migrate --wait` or `events --follow` may run
    for hours after drover() returns, so collection is on by then, start-up objects frozen."""
    code = (
        "import gc\ngc.disable()\nfrom producer.cli_common import drover\ndrover()\n"
        "print(gc.isenabled(), gc.get_freeze_count() > 0)"
    )
    assert probe(code) == "True True"


def test_start_up_over_leaves_a_collecting_interpreter_alone() -> None:
    """Imported without main() (a test, a script), nothing is frozen and collection stays on."""
    code = (
        "import gc\nfrom producer.cli_common import start_up_over\nstart_up_over()\n"
        "print(gc.isenabled(), gc.get_freeze_count())"
    )
    assert probe(code) == "True 0"


def test_main_turns_collection_back_on_for_whoever_called_it() -> None:
    for args in (["--help"], ["jobs", "--limit", "0"], ["lab", "--help"]):
        code = (
            f"import gc, sys\nsys.argv = ['drover', *{args!r}]\nfrom cli.main import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint(gc.isenabled())"
        )
        assert probe(code) == "True", args


def test_a_producer_loads_no_worker_side_message_checks() -> None:
    """config/message_checks.py (on Celery's worker Request and strategy) is the consumer's:
    Celery imports it by name when a worker consumes, never when a producer signs and sends."""
    code = (
        "import sys\nimport producer.api, config.celery\n"
        "print(sorted({'config.message_checks', 'celery.worker.request', "
        "'celery.worker.strategy'} & set(sys.modules)))"
    )
    assert probe(code) == "[]"
    code = (
        "from kombu.utils.imports import symbol_by_name\nfrom config.security import DroverTask\n"
        "from config import message_checks as m\n"
        "print(symbol_by_name(DroverTask.Request) is m.CheckedRequest, "
        "symbol_by_name(DroverTask.Strategy) is m.checked_strategy)"
    )
    assert probe(code) == "True True"


def test_the_python_api_loads_evacuations_and_control_when_first_used() -> None:
    """A migration (`drover migrate`) needs neither; a Drover makes them on first use."""
    code = (
        "import sys\nfrom producer.api import Drover\nd = Drover()\n"
        "lazy = {'jobs.evacuation', 'jobs.evacuations', 'producer.control'}\n"
        "before = sorted(lazy & set(sys.modules))\n"
        "assert d.evacuations is d.evacuations and d._control is d._control\n"
        "d.evacuations_service\nprint(before, sorted(lazy & set(sys.modules)))"
    )
    assert probe(code) == "[] ['jobs.evacuation', 'jobs.evacuations', 'producer.control']"


def test_the_python_api_builds_its_celery_app_signer_and_admission_when_first_used() -> None:
    """`drover job`, `events` and `wait` only read: a Drover loads no key (Celery's signing
    and the request signer each load and check it) and builds no app until it sends."""
    code = (
        "from producer.api import Drover\nd = Drover()\n"
        "lazy = ('_app', 'signer', 'admission')\n"
        "before = [n for n in lazy if n in vars(d)]\n"
        "assert d._app is d._app and d.admission is d.admission and d.signer is d.signer\n"
        "print(before, [n for n in lazy if n in vars(d)])"
    )
    assert probe(code) == "[] ['_app', 'signer', 'admission']"
