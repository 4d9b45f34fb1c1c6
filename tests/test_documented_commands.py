"""Every `sclip` command written in a config header or in the README runs as written.

The commands are read from the files themselves (comment lines of each config's header; the
```bash blocks of README.md, with their shell variables) and run in order, as a user would
paste them, from a fresh folder (the repository's ``configs/`` given by its path), through
the entry points of ``sclip`` and ``sclip-export`` at tiny size: a tiny model, fixture data
in the configs' native layouts (data roots such as ``/data/RSICD`` are overridden by
arguments appended after the documented ones), two training steps, CPU. Every path a command
names (``--ckpt_path <run>/checkpoints/last.ckpt``, ``lightning_logs/version_0/...``) must
exist when the command runs: a config that promises a ``last.ckpt`` must write one. Other
commands (``make ...``) are not run here.

The README's examples of a user's own code are run too: a ```python block whose first line is
``# mypackage/<name>.py`` becomes the module ``mypackage.<name>`` (so commands naming its
classes run as written), and a ```yaml block whose first line is ``# <file>.yaml: <command>``
is written to ``<file>.yaml`` in the run's folder and its command run.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from cli_overrides import TINY_RUN, data_overrides, model_overrides

from sclip_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def _join_continuations(lines: list[str]) -> list[str]:
    out: list[str] = []
    for line in lines:
        if out and out[-1].endswith("\\"):
            out[-1] = out[-1][:-1] + " " + line.strip()
        else:
            out.append(line.strip())
    return out


def _is_command(line: str) -> bool:
    return line.startswith(("sclip ", "sclip-export "))


def header_commands(config: Path) -> list[str]:
    """The `sclip ...` commands in the comment lines of a config's header."""
    lines = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#"))
    return [c for c in _join_continuations(lines) if _is_command(c)]


def user_package() -> None:
    """The README's ``# mypackage/<name>.py`` blocks, importable as ``mypackage.<name>``."""
    import sys
    import types

    text = (REPO / "README.md").read_text()
    package = sys.modules.setdefault("mypackage", types.ModuleType("mypackage"))
    package.__path__ = []  # type: ignore[attr-defined]
    for name, body in re.findall(r"```python\n# mypackage/(\w+)\.py\n(.*?)```", text, flags=re.S):
        module = types.ModuleType(f"mypackage.{name}")
        sys.modules[module.__name__] = module
        setattr(package, name, module)
        exec(compile(body, f"README.md:mypackage/{name}.py", "exec"), module.__dict__)


def readme_yaml_files() -> list[tuple[str, str, str]]:
    """``(file name, command, content)`` of each ```yaml block headed ``# <file>.yaml: <cmd>``."""
    text = (REPO / "README.md").read_text()
    return re.findall(r"```yaml\n# ([\w.]+\.yaml): (sclip [^\n]*)\n(.*?)```", text, flags=re.S)


def readme_blocks() -> list[list[str]]:
    """Each ```bash block of the README that holds `sclip` commands, variables expanded."""
    text = (REPO / "README.md").read_text()
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        env: dict[str, str] = {}
        cmds = []
        for line in _join_continuations(body.splitlines()):
            assignment = re.fullmatch(r"([A-Za-z_]\w*)=(\S+)", line)
            if assignment:
                env[assignment[1]] = assignment[2]
            elif _is_command(line):
                for name, value in env.items():
                    line = line.replace(f"${name}", value)
                cmds.append(line)
        if cmds:
            blocks.append(cmds)
    return blocks


DOCUMENTED = {
    **{
        str(p.relative_to(REPO)): header_commands(p)
        for p in sorted(CONFIGS.rglob("*.yaml"))
        if header_commands(p)
    },
    **{f"README.md block {i}": cmds for i, cmds in enumerate(readme_blocks())},
    **{f"README.md {name}": [command] for name, command, _ in readme_yaml_files()},
}


def test_the_documents_hold_commands():
    assert "configs/demo.yaml" in DOCUMENTED and "configs/real/rsicd_mini_lit.yaml" in DOCUMENTED
    assert sum(k.startswith("README") for k in DOCUMENTED) >= 2
    assert "README.md my_objective.yaml" in DOCUMENTED


@pytest.mark.parametrize("doc", list(DOCUMENTED))
def test_documented_commands_run_as_written(doc, tmp_path, tiny_lit, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs, exports and logs land here, as in a user's folder
    user_package()
    for name, _, content in readme_yaml_files():
        (tmp_path / name).write_text(content)
    for command in DOCUMENTED[doc]:
        program, *argv = shlex.split(command, comments=True)
        argv = [str(REPO / a) if a.startswith("configs/") else a for a in argv]
        if program == "sclip-export":
            from sclip_lightning.export import main as export

            for path in (argv[0], *(argv[i + 1] for i, a in enumerate(argv) if a == "--results")):
                assert Path(path).is_file(), f"{doc}: `{command}` names {path}, not written"
            export(argv)
            continue
        if "--model.help" in argv:
            with pytest.raises(SystemExit) as e:
                main(argv)
            assert e.value.code == 0
            continue
        configs = [Path(argv[i + 1]) for i, a in enumerate(argv) if a == "--config"]
        for i, arg in enumerate(argv):  # runs land in tmp_path, where the paths must exist
            if arg == "--ckpt_path":
                path = argv[i + 1].replace("<run>", "lightning_logs/version_0")
                assert Path(path).is_file(), f"{doc}: `{command}` names {argv[i + 1]}, not written"
                argv[i + 1] = path
        tiny = [
            *model_overrides(configs, tiny_lit),
            *data_overrides(configs, tmp_path),
            *TINY_RUN,
            "--trainer.num_nodes=1",
            "--trainer.strategy=auto",
        ]
        if argv[0] == "fit":
            tiny.append("--trainer.max_steps=2")
        main([*argv, *tiny])
