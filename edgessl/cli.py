"""The `edgessl` command: a thin shell over the library (heavy imports inside commands)."""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import sys

import click
from click.core import ParameterSource

from edgessl import api
from edgessl.api import Run
from edgessl.config import FITS, FORMATS, PRECISIONS, SELECT_RULES, Config, FinetuneConfig, flagged, shortcut
from edgessl.errors import EdgesslError, Stopped
from edgessl_edge.image import EdgeError
from edgessl.version import __version__


def _default(fn, name: str):
    """The API's default for a keyword: the CLI's option defaults are the API's, declared once."""
    return inspect.signature(fn).parameters[name].default


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="edgessl")
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
@click.pass_context
def cli(ctx, debug):
    """Self-supervised pretraining of small timm backbones, shipped to the edge."""
    ctx.ensure_object(dict)["debug"] = debug


class _Parsed(click.ParamType):
    """A config setting's own parser (config.py) as a click type: its ValueError is click's usage error."""

    def __init__(self, parse, name: str):
        self.parse, self.name = parse, name

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            return self.parse(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _option(s) -> dict:
    """click.option keywords for a declared setting (config.setting): its help, choices, parser,
    default, and where the data decides it, the rule."""
    m = s.metadata
    kw = {"help": m["help"] + (f" [default: picked: {m['auto']}]" if m["auto"] else "")}
    if s.default is False:
        return {**kw, "is_flag": True}
    choices = m["cli_choices"] or m["choices"]
    if m["registry"]:
        module, _, name = m["registry"].partition(":")
        choices = tuple(getattr(importlib.import_module(module), name))
    parse = m["parse"]
    if choices:
        kw["type"] = click.Choice([str(c) for c in choices])
        if parse:
            kw["callback"] = lambda ctx, param, v: v if v is None else parse(v)
    elif parse:
        kw["type"] = {int: click.INT, float: click.FLOAT}.get(parse) or _Parsed(parse, s.name)
    if not m["auto"] and s.default not in (None, "", dataclasses.MISSING):
        kw["default"] = s.default
    return kw


def setting_options(cls):
    """The click options of every setting of `cls` that declares a flag (config.py), in its order."""
    def decorate(command):
        for s in reversed(flagged(cls).values()):
            command = click.option(s.metadata["flag"], shortcut(s), **_option(s))(command)
        return command
    return decorate


@cli.command()
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML recipe overriding the defaults.")
@setting_options(Config)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary as the last line of stdout.")
@click.pass_context
def pretrain(ctx, out, config_path, resume, as_json, **flags):
    """Pretrain a backbone on unlabelled images with a single-view method."""
    given = {flag: value for flag, value in flags.items() if _given(ctx, flag)}
    result = api.pretrain(out=out, config=config_path, resume=resume, **given).summary
    if as_json:
        click.echo(json.dumps(result))
    if result["stopped_early"]:  # SIGINT / SIGTERM: checkpointed at a step boundary
        sys.exit(130)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=True),
              help="MODEL.onnx, MODEL.xml (openvino), MODEL.tflite (litert), MODEL.pte (executorch), or a folder "
                   "with --format timm.")
@click.option("--format", type=click.Choice([*FORMATS, "timm"]), default=_default(Run.export, "format"),
              help="The runtime the file is for; each is checked in that runtime.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=_default(Run.export, "precision"))
@click.option("--calib", help="Calibration images for int8 (dataset spec; default: the run's own data).")
@click.option("--calib-count", type=int, default=_default(Run.export, "calib_count"))
@click.option("--batch", default=_default(Run.export, "batch"), help="'dynamic' or a fixed batch size (NNAPI, "
              "CoreML); LiteRT and ExecuTorch files have one batch size: 1 unless given.")
@click.option("--opset", type=int, default=_default(Run.export, "opset"))
@click.option("--with-head", is_flag=True, help="Export the projection head too (unit-norm z).")
@click.option("--adapt/--no-adapt", default=None, help="int8 of a hard-swish network (MobileNetV3): export a ReLU "
              "student distilled from it [default: the runtime's choice, printed by the export; a student "
              "that loses over a kNN point on the run's labelled held-out images gives way to the network].")
@click.option("--adapt-seconds", type=float, default=_default(Run.export, "adapt_seconds"),
              help="Longest distillation for --adapt; the student stops sooner once it settles.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report as the last line of stdout.")
def export(run_dir, out, as_json, **options):
    """Export a run's encoder or classifier for a runtime (checked in that runtime) or as timm weights."""
    from edgessl import exporter as export_lib

    report = Run(run_dir).export(out, **options)
    if options["format"] == "timm":
        click.echo(f"wrote {report['path']}/{{model.safetensors, config.json}} ({report['architecture']})")
    else:
        _print_export(report, options["format"], options["precision"])
        if advice := export_lib.export_advice(report):
            click.echo(advice)
    if as_json:
        click.echo(json.dumps(report))


def _print_export(report: dict, fmt: str, precision: str) -> None:
    """What an export wrote and measured, and why int8 quantised the network it did."""
    from edgessl import exporter as export_lib
    from edgessl.formats import FORMATS

    spec = FORMATS[fmt]
    if report.get("int8_network") and (report["int8_network"] == "relu_student") == spec.int8_student:
        click.echo(f"int8: {spec.why}")
    if "student_rejected" in report:
        r = report["student_rejected"]
        click.echo(f"int8: the ReLU student lost {-r['knn_change']:.2f} kNN points on the run's held-out images in "
                   f"torch fp32 ({r['knn_student']:.2f} % against {r['knn_teacher']:.2f} %), more than "
                   f"{export_lib.ADAPT_MAX_KNN_LOSS:g}; the network as trained is quantised instead (slower in int8; "
                   "--adapt ships the student)")
    if "adapted" in report:
        a = report["adapted"]
        click.echo(f"int8 student: {a['swapped']} hard-swish became ReLU and {a['se_folded']} squeeze-excite "
                   f"blocks their mean gates, folded into the next conv; the student was distilled from the run "
                   f"for {a['seconds']:.0f} s ({a['steps']} steps, "
                   f"{'until it settled' if a['stopped'] == 'settled' else 'stopped by --adapt-seconds'}, "
                   f"feature cosine to the original {a['feature_cosine_to_original']:.3f}); "
                   "--no-adapt exports the network as it is")
    knn = (f", kNN {report['knn_export']:.2f} % ({report['knn_change']:+.2f} vs torch fp32)"
           if "knn_export" in report else "")
    if "top1_agreement" in report:
        knn = (f", top-1 agrees with torch fp32 on {100 * report['top1_agreement']:.1f} % of "
               f"{report['agreement_images']} held-out images")
    click.echo(f"wrote {report['path']} ({report['size_bytes'] / 2**20:.2f} MB, {precision}): "
               f"max abs diff {report['max_abs_diff']:.2e}, min cosine {report['min_cosine']:.6f} vs torch, "
               f"latency {report['latency_ms_p50']:.2f} ms at batch {report['latency_batch']}{knn}")
    if "speedup_vs_fp32" in report:
        click.echo(f"speed-up  {export_lib.speedup_line(report['speedup_vs_fp32'])} against the run's fp32 {fmt} "
                   "file, timed side by side on this CPU")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--formats", default=_default(Run.benchmark, "formats"), help="Comma-separated runtimes.")
@click.option("--precisions", default=_default(Run.benchmark, "precisions"), help="Comma-separated precisions.")
@click.option("--adapt-seconds", type=float, default=_default(Run.benchmark, "adapt_seconds"),
              help="Longest distillation of the int8 ReLU student (it stops sooner once it settles).")
@click.option("--both-int8", is_flag=True, help="A second int8 row per runtime with the other network (ReLU student "
              "or as trained), to measure the choice.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON as the last line of stdout.")
def benchmark(run_dir, as_json, **options):
    """Every runtime x precision of a run (encoder or classifier) in one table: status, MB, kNN or
    top-1 agreement, ms at batch 1 and 32, speed-up over ONNX fp32. Files go to RUN_DIR/benchmark/."""
    rows = Run(run_dir).benchmark(**options)
    click.echo(api.benchmark_table(rows))
    if as_json:
        click.echo(json.dumps(rows))


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--against", type=click.Path(file_okay=False), help="Run directory to compare features with.")
@click.option("--data", help="Images for the parity check (default: the run's own data).")
@click.option("--batch-sizes", default=_default(api.check, "batch_sizes"),
              help="Comma-separated batch sizes for latency.")
@click.option("--threads", type=int, default=_default(api.check, "threads"),
              help="onnxruntime intra-op threads (0: its default).")
@click.option("--profile", is_flag=True, help="Time per operator type (onnxruntime's profiler), float islands named.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report as the last line of stdout.")
def check(model, as_json, **options):
    """Check an exported ONNX model through onnxruntime: parity and latency."""
    report = api.check(model, **options)
    click.echo(f"{report['path']} ({report['precision']}, {report['provider']})")
    if "max_abs_diff" in report:
        vs = " (a ReLU student: compared with the run's original network)" if report.get("adapted") else ""
        click.echo(f"parity     max abs diff {report['max_abs_diff']:.2e}, min cosine {report['min_cosine']:.6f}{vs}")
    for b, lat in report["latency_ms"].items():
        click.echo(f"batch {b:>4}  p50 {lat['p50']:.2f} ms  p90 {lat['p90']:.2f} ms  p99 {lat['p99']:.2f} ms  "
                   f"{report['images_per_s'][b]:.0f} images/s")
    if options["profile"]:
        p = report["profile"]
        click.echo(f"profile    batch {p['batch']}, {p['iters']} runs, time per operator type per run "
                   f"(onnxruntime's profiler):")
        for r in p["ops"]:
            island = "  float island" if r in p["float_islands"] else ""
            click.echo(f"  {r['op']:<24} {r['nodes']:>4} nodes  {r['ms']:8.3f} ms  {100 * r['share']:5.1f} %{island}")
        if p["float_islands"]:
            click.echo(f"  float islands: {100 * p['float_share']:.1f} % of the time in "
                       f"{', '.join(r['op'] for r in p['float_islands'])}")
    if as_json:
        click.echo(json.dumps(report))


@cli.command()
@click.argument("source")
@click.option("--train", required=True, help="Labelled images for the kNN memory / linear fit.")
@click.option("--test", required=True, help="Labelled images to classify.")
@click.option("--knn-k", type=int, default=_default(api.probe, "knn_k"))
@click.option("--linear", is_flag=True, help="Also fit a linear classifier (L-BFGS) on frozen features.")
@click.option("--grid", type=click.Path(dir_okay=False), help="Write a PNG: 8 test images and their 8 neighbours.")
@click.option("--image-size", type=int, help="pixels and random:BACKBONE: the input size (a run or an ONNX file "
              "uses its own).")
@click.option("--fit", type=click.Choice(FITS), default=_default(api.probe, "fit"),
              help="pixels and random:BACKBONE: how non-square images are made square (a run uses its own).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report as the last line of stdout.")
def probe(source, as_json, **options):
    """Probe frozen features: SOURCE is a run directory, a .onnx file, random:BACKBONE or pixels."""
    r = api.probe(source, **options)
    knn_k, linear = options["knn_k"], options["linear"]
    line = f"{r['what']}: kNN top-1 {r['knn_top1']:.2f} %"
    line += f" (top-5 {r['knn_top5']:.2f} %)" if "knn_top5" in r else ""
    line += f", linear top-1 {r['linear_top1']:.2f} % (weight decay {r['linear_weight_decay']:g})" if linear else ""
    click.echo(f"{line}  [{r['n_train']} train / {r['n_test']} test images, {r['feature_dim']}-d, "
               f"k={knn_k}, {r['seconds']:.1f} s]")
    if as_json:
        click.echo(json.dumps(r))


@cli.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory for the classifier.")
@setting_options(FinetuneConfig)
@click.option("--resume", is_flag=True, help="Continue the fine-tuning run in --out with its stored settings.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary as the last line of stdout.")
def finetune(run_dir, out, resume, as_json, train, test, label_fraction, labels_per_class, **settings):
    """Fine-tune a pretrained encoder plus a linear head on a few labels (RUN_DIR --train --test,
    or --out DIR --resume)."""
    settings = {k: v for k, v in settings.items() if v is not None}  # (an auto setting not given: its rule)
    if resume:  # the stored settings, but where it runs
        settings = {k: settings[k] for k in ("device", "precision")}
    r = api.finetune(run_dir, train or "", test or "", out, label_fraction=label_fraction,
                     labels_per_class=labels_per_class, resume=resume, **settings).summary
    if as_json:
        click.echo(json.dumps(r))
    if r["stopped_early"]:  # SIGINT / SIGTERM: checkpointed at a step boundary
        sys.exit(130)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--budget", required=True, type=int, help="How many images to pick.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="picks.csv (rank,path); the labelling page is written beside it (picks.html).")
@click.option("--data", help="Pick from these images (dataset spec) instead of the run's training images.")
@click.option("--exclude", type=click.Path(dir_okay=False),
              help="A CSV with a path column (an earlier labels.csv or picks.csv): those images are labelled.")
@click.option("--rule", type=click.Choice(SELECT_RULES), default=_default(Run.select, "rule"),
              help="graph: greedy cover under the diffusion kernel of the features' kNN graph; typical: the most "
                   "typical image of each k-means cluster; herding: greedy cover under a Gaussian kernel; kmeans: the "
                   "image nearest each centre; coverage: greedy cover by balls of pure radius; "
                   "random: a uniform draw.")
@click.option("--seed", type=int, default=_default(Run.select, "seed"), help="Seed of the clustering or the draw.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary as the last line of stdout.")
def select(run_dir, as_json, **options):
    """Which images to label first: BUDGET of the run's images in priority order, and a page to label them."""
    r = Run(run_dir).select(**options)
    kept = "kept with the run" if r["features_cached"] else "computed"
    click.echo(f"picked {len(r['picks'])} of {r['pool'] - r['excluded']} images by {options['rule']} in "
               f"{r['select_seconds']:.1f} s (features {kept} in {r['embed_seconds']:.1f} s): {r['csv']}; "
               f"label them in {r['page']}, then `edgessl finetune {run_dir} --labels labels.csv`")
    if as_json:
        click.echo(json.dumps(r))


@cli.command()
@click.argument("source")
@click.option("--data", required=True, help="Images to embed (dataset spec).")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="FILE.npy (+ FILE.json: ids, files, labels), FILE.npz or FILE.csv.")
@click.option("--bad-images", type=click.Choice(["fail", "skip"]), default=_default(api.embed, "bad_images"),
              help="folder: undecodable images fail, or are left out (named in the sidecar's row ids).")
def embed(source, data, out, bad_images):
    """Features of every image: SOURCE is a run directory, a .onnx file, random:BACKBONE or pixels."""
    e = api.embed(source, data, out, bad_images)
    click.echo(f"wrote {out}: {e.features.shape[0]} x {e.features.shape[1]} features of {data}")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="HTML file (default: RUN_DIR/report.html).")
def report(run_dir, out):
    """One self-contained HTML page about a run: config, curves, neighbours, exports (a fine-tuned
    classifier: its labels, test curve and exports)."""
    click.echo(f"wrote {Run(run_dir).report(out)}")


@cli.group()
def cache():
    """The decoded-folder caches (~/.cache/edgessl, or $XDG_CACHE_HOME/edgessl)."""


@cache.command("list")
def cache_list():
    """One line per cache: size, images, image size, last used, the folder it decodes."""
    import time

    entries = api.caches()
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"]))
        state = "" if e["whole"] else "  (damaged: rebuilt on next use)"
        click.echo(f"{e['bytes'] / 2**20:9.1f} MB  {e['count'] or '?':>7} images  {e['image_size'] or '?':>4} px  "
                   f"used {used}  {e['root']}{state}")
    click.echo(f"{len(entries)} caches, {sum(e['bytes'] for e in entries) / 2**20:.1f} MB in {api.cache_dir()}")


@cache.command("clean")
@click.option("--older-than", type=float, default=_default(api.clean_caches, "older_than"),
              help="Only caches not used for this many days (0: all).")
def cache_clean(older_than):
    """Remove caches (none that a running process is building); they are rebuilt when needed."""
    removed = api.clean_caches(older_than)
    click.echo(f"removed {len(removed)} caches")


def main() -> None:
    debug = "--debug" in sys.argv[1:3]
    try:
        cli.main(standalone_mode=False, prog_name="edgessl")
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:  # one line, like every other input error
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except Stopped as e:  # a stop request, its work saved to continue from
        click.echo(f"stopped: {e}", err=True)
        sys.exit(130)
    except (EdgesslError, EdgeError) as e:  # EdgeError: a file the edge runtime could not open or run
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
