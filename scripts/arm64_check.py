"""The device package on ARM64: files exported on this x86 machine, run by `edgessl-edge` in a
Debian arm64 Python under qemu-user-static: the fp32 files must give the same top-1 for every
image as here (exit 1 otherwise); how often the int8 files do is reported (int8 kernels round
differently on ARM).

    make arm64-check       # or, as root: .venv/bin/python scripts/arm64_check.py --out runs/arm64_check

A one-epoch run on flower photos (../shared; synthetic images without it), a fine-tuned classifier,
and their fp32 and int8 .onnx and .tflite files; then `pip install ./export[onnx,litert]` in the
arm64 Python (wheels from PyPI) and build-gallery / classify / predict on both machines. Needs
root (chroot, binfmt_misc), Debian's qemu-user-static and debootstrap (the make target installs
them) and about 400 MB for the arm64 system (kept in --root). Writes OUT/arm64_check.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import edgessl

REPO = Path(__file__).resolve().parents[1]
FLOWERS = REPO.parent / "shared" / "data" / "flowers"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
INSIDE = Path("/tmp/edgessl-arm64")  # the work folder as the arm64 Python sees it
FILES = ("encoder.onnx", "encoder-int8.onnx", "encoder.tflite", "encoder-int8.tflite",
         "classifier.onnx", "classifier-int8.onnx", "classifier.tflite", "classifier-int8.tflite")


def sh(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def arm64_python(root: Path) -> None:
    """binfmt_misc knows qemu-aarch64 (registered with the F flag: usable inside a chroot), and
    `root` holds a Debian arm64 system with a venv /opt/edge."""
    if not (BINFMT / "register").exists():
        sh("mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT)
    if not (BINFMT / "qemu-aarch64").exists():
        (BINFMT / "register").write_text(Path("/usr/lib/binfmt.d/qemu-aarch64.conf").read_text().strip())
    if not (root / "opt/edge/bin/python").exists():
        if not (root / "usr/bin/python3").exists():
            sh("debootstrap", "--arch=arm64", "--variant=minbase", "--include=python3,python3-venv", "bookworm",
               root, "http://deb.debian.org/debian", stdout=subprocess.DEVNULL)
        chroot(root, "python3", "-m", "venv", "/opt/edge")


def chroot(root: Path, *cmd, capture: bool = False) -> str:
    """cmd in the arm64 system, with the host's CA certificates and name servers (pip reaches PyPI)."""
    for f in ("etc/resolv.conf", "etc/ssl/certs/ca-certificates.crt"):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path("/") / f, root / f)
    env = {"PATH": "/opt/edge/bin:/usr/bin:/bin", "HOME": "/root", "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "LC_ALL": "C.UTF-8"}
    sh("mount", "-t", "proc", "proc", root / "proc")
    try:
        r = sh(shutil.which("chroot") or "/usr/sbin/chroot", root, *cmd, env=env, capture_output=capture, text=True)
    finally:
        sh("umount", root / "proc")
    return r.stdout if capture else ""


def images(work: Path) -> tuple[str, Path, Path]:
    """(the pretraining spec, a labelled gallery folder, a folder of test images)."""
    gallery, test = work / "gallery", work / "test"
    for folder, split, n in ((gallery, "train", 12), (test, "val", 10)):
        if FLOWERS.is_dir():
            for cls in sorted(p.name for p in (FLOWERS / split).iterdir()):
                (folder / cls).mkdir(parents=True, exist_ok=True)
                for f in sorted((FLOWERS / split / cls).iterdir())[:n]:
                    shutil.copy(f, folder / cls / f.name)
        else:  # coloured noise, a colour per class
            from PIL import Image

            rng = np.random.default_rng(len(split))
            for c in range(3):
                (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    x = np.clip(rng.normal(60 + 60 * c, 40, (72, 72, 3)), 0, 255).astype(np.uint8)
                    Image.fromarray(x).save(folder / f"c{c}" / f"{i}.png")
    spec = f"folder:{FLOWERS / 'train'}" if FLOWERS.is_dir() else f"folder:{gallery}"
    return spec, gallery, test


def export_files(work: Path, spec: str, gallery: Path) -> None:
    run = edgessl.pretrain(spec, work / "run", epochs=1, val_fraction=0.0, progress=False, log=lambda *_: None)
    clf = edgessl.finetune(run, f"folder:{gallery}", f"folder:{gallery}", work / "clf", epochs=2, progress=False,
                           log=lambda *_: None)
    for name in FILES:
        source = run if name.startswith("encoder") else clf
        fmt = "litert" if name.endswith(".tflite") else "onnx"
        source.export(work / name, precision="int8" if "int8" in name else "fp32", format=fmt, adapt_seconds=20,
                      timing=False)


def answers(work: Path, run) -> dict:
    """{file: {command: {image: top-1}}} from edgessl-edge run by `run(argv) -> stdout`."""
    out: dict = {}
    tests = sorted(str(p.relative_to(work)) for p in (work / "test").rglob("*") if p.is_file())
    for name in FILES:
        if name.startswith("encoder"):
            g = f"{name}.gallery.npz"
            run(["build-gallery", name, "gallery", "--out", g])
            lines = run(["classify", name, g, *tests]).splitlines()
            out[name] = {"classify": dict(line.split("\t") for line in lines)}
        else:
            rows = [json.loads(line) for line in run(["predict", name, *tests, "--json", "--top-k", "2"]).splitlines()]
            out[name] = {"predict": {r["image"]: r["top"][0]["class"] for r in rows},
                         "margin": {r["image"]: r["top"][0]["probability"] - r["top"][1]["probability"] for r in rows}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/arm64_check")
    ap.add_argument("--root", default=os.path.expanduser("~/.cache/edgessl/arm64-bookworm"))
    args = ap.parse_args()
    out, root = Path(args.out), Path(args.root)
    t0 = time.time()
    arm64_python(root)
    t_system = time.time() - t0
    work = root / INSIDE.relative_to("/")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec, gallery, _ = images(work)
    export_files(work, spec, gallery)
    t_export = time.time() - t0 - t_system
    x86 = answers(work, lambda argv: sh(sys.executable, "-m", "edgessl_edge", *argv, cwd=work, capture_output=True,
                                        text=True).stdout)
    shutil.copytree(REPO / "export", work / "export", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    t1 = time.time()
    chroot(root, "pip", "install", "-q", f"{INSIDE}/export[onnx,litert]")
    t_install = time.time() - t1
    t1 = time.time()
    arm = answers(work, lambda argv: chroot(root, "sh", "-c", f"cd {INSIDE} && edgessl-edge " + " ".join(argv),
                                            capture=True))
    t_arm = time.time() - t1
    rows = []
    for name, per in x86.items():
        cmd = "classify" if "classify" in per else "predict"
        differ = [k for k, v in per[cmd].items() if arm[name][cmd].get(k) != v]
        rows.append({"file": name, "command": cmd, "images": len(per[cmd]), "same_top1": len(per[cmd]) - len(differ)})
        if "margin" in per:  # how close the x86 file's top two classes were on the images that differ
            rows[-1]["x86_top2_margin_where_they_differ"] = [round(per["margin"][k], 4) for k in differ]
    machine = chroot(root, "python3", "-c", "import platform; print(platform.machine())", capture=True).strip()
    # fp32 must agree on every image; int8 kernels round differently on ARM (reported, not required)
    fp32_same = all(r["same_top1"] == r["images"] for r in rows if "int8" not in r["file"])
    report = {"arm64_machine": machine, "rows": rows, "fp32_all_same": fp32_same,
              "seconds": {"arm64_system": round(t_system), "pretrain_finetune_export_x86": round(t_export),
                          "pip_install_arm64": round(t_install), "edgessl_edge_arm64": round(t_arm),
                          "total": round(time.time() - t0)}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "arm64_check.json").write_text(json.dumps(report, indent=1))
    for r in rows:
        print(f"{r['file']:24s} {r['command']:9s} {r['same_top1']}/{r['images']} images, the same top-1 on {machine}")
    print(json.dumps(report["seconds"]))
    sys.exit(0 if fp32_same else 1)


if __name__ == "__main__":
    main()
