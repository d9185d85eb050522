"""`python -m dpdm <command>`: the one entry point every workflow rule calls.

Commands that work on a cell take its settings either resolved by the workflow
(`--settings JSON`, a JSON string or file) or from config files and the cell's
coordinates (`--config config/smoke.yaml --dataset digits --eps 10 --seed 0`).
Imports of heavy modules happen inside each command so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from dpdm.artifacts import DPDMError
from dpdm.memory import keep_freed_memory
from dpdm.registry import CLASSIFIERS

log = logging.getLogger("dpdm")


def _add_settings_args(p: argparse.ArgumentParser, need_cell: bool = True) -> None:
    g = p.add_argument_group("cell settings (either --settings, or --config with the cell)")
    g.add_argument("--settings", help="resolved cell settings: a JSON string or a .json file")
    g.add_argument("--config", action="append", default=[], help="config YAML (repeatable; later files win)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set defaults.train.epochs=2")
    g.add_argument("--dataset")
    g.add_argument("--eps", type=float)
    g.add_argument("--seed", type=int, default=0)


def _read_json_arg(text: str, option: str = "--settings") -> dict:
    """A JSON object given as a string, or the path of a JSON file."""
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise DPDMError(f"{option} '{text}' is neither a JSON object nor an existing .json file")
        text = path.read_text()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DPDMError(f"{option} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DPDMError(f"{option} must be a JSON object, got {type(obj).__name__}")
    return obj


# The sections of a cell's resolved settings each command reads (the workflow passes
# exactly these; see rules/common.smk STAGE_SECTIONS).
NEEDED_SECTIONS = {
    "train": ("cell", "data", "model", "diffusion", "train", "privacy"),
    "pretrain": ("pretrain", "data", "model", "diffusion"),
    "sample": ("cell", "sample", "samplers"),
    "classify": ("cell", "classify"),
    "judge": ("cell",),
    "baseline": ("cell", "privacy", "baseline"),
}


def _settings(args: argparse.Namespace) -> dict:
    from dpdm import config as cfg

    if args.settings:
        settings = _read_json_arg(args.settings)
        missing = [k for k in NEEDED_SECTIONS.get(args.command, ()) if k not in settings]
        if missing:
            raise DPDMError(f"--settings lacks {', '.join(missing)}, which `{args.command}` needs: pass a cell's "
                            "resolved settings (as the workflow does), or --config files with --dataset and --eps")
        return settings
    if args.dataset is None or args.eps is None:
        raise DPDMError("give --settings, or --dataset and --eps (with --config files) to resolve the cell")
    config = cfg.load_config(args.config, args.overrides)
    return cfg.resolve_cell(config, args.dataset, args.eps, args.seed)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_prepare(args):
    from dpdm import config as cfg
    from dpdm import data

    raw = cfg.env_or(args.raw_dir, "DPDM_RAW_DIR")
    data.prepare(
        args.dataset,
        out_dir=Path(args.out),
        raw_dir=Path(raw) if raw else None,
        download=not args.no_download,
        digits_size=args.digits_size,
    )


def cmd_fetch_weights(args):
    from dpdm import fid

    fid.fetch_weights(Path(args.out))


def cmd_fid_ref(args):
    from dpdm import config as cfg
    from dpdm import fid

    fid.compute_reference(
        data_dir=Path(args.data),
        split=args.split,
        out_path=Path(args.out),
        extractor=args.extractor,
        weights_path=cfg.env_or(args.weights, "DPDM_FID_WEIGHTS"),
        batch_size=args.batch_size,
        device=args.device,
        num_images=args.num_images,
        keep_features=args.keep_features,
    )


def cmd_fid(args):
    from dpdm import config as cfg
    from dpdm import fid

    fid.compute_fid(
        samples_path=Path(args.samples),
        ref_path=[Path(r) for r in args.ref],
        out_path=Path(args.out),
        extractor=args.extractor,
        weights_path=cfg.env_or(args.weights, "DPDM_FID_WEIGHTS"),
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        device=args.device,
        settings=_read_json_arg(args.settings) if args.settings else None,
        prdc_k=args.prdc_k,
    )


def _append_log(path: Path) -> None:
    """Also log to `path`, appending under a numbered attempt header: Snakemake empties a
    rule's log when a job (or its retry) starts, this file keeps every attempt."""
    import datetime
    import socket

    path.parent.mkdir(parents=True, exist_ok=True)
    previous = path.read_text().count("=== attempt ") if path.exists() else 0
    with path.open("a") as f:
        f.write(f"=== attempt {previous + 1}: {datetime.datetime.now().isoformat(timespec='seconds')} on "
                f"{socket.gethostname()}, pid {os.getpid()} ===\n")
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)


def cmd_train(args):
    from dpdm import launch, privacy, train

    launch.relaunch(args.procs_per_node, args.nodes, args.argv)  # several processes: exec torchrun
    settings = _settings(args)
    if args.log_file and int(os.environ.get("RANK", "0")) == 0:
        _append_log(Path(args.log_file))
    with privacy.process_group_from_env(settings.get("device", "auto")):  # under torchrun: one rank of several
        train.train(settings, data_dir=Path(args.data), out_dir=Path(args.out),
                    checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None,
                    stop_with_parent=args.stop_with_parent, init_path=args.init)


def cmd_pretrain(args):
    from dpdm import config as cfg
    from dpdm import pretrain

    if args.settings:
        settings = _settings(args)
    elif args.name:
        settings = cfg.pretrain_settings(cfg.load_config(args.config, args.overrides), args.name)
    else:
        raise DPDMError("give --settings, or --name (with --config files) to resolve the public model")
    if args.log_file:
        _append_log(Path(args.log_file))
    pretrain.pretrain(settings, data_dir=Path(args.data), out_dir=Path(args.out), stop_with_parent=args.stop_with_parent)


def cmd_sample(args):
    from dpdm import sampling

    sampling.generate(
        _settings(args),
        model_path=Path(args.model),
        sampler_name=args.sampler,
        out_path=Path(args.out),
        grid_path=Path(args.grid) if args.grid else None,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
    )


def cmd_classify(args):
    from dpdm import classifiers

    classifiers.classify(_settings(args), samples_path=Path(args.samples), test_path=Path(args.test),
                         classifier=args.classifier, out_path=Path(args.out))


def cmd_judge_fit(args):
    from dpdm import classifiers

    classifiers.fit_judge(Path(args.data), args.classifier, args.epochs, Path(args.out))


def cmd_judge(args):
    from dpdm import classifiers

    classifiers.judge_samples(_settings(args), judge_path=Path(args.judge), samples_path=Path(args.samples),
                              out_path=Path(args.out))


def cmd_baseline(args):
    from dpdm import classifiers

    classifiers.dp_baseline(_settings(args), data_dir=Path(args.data), classifier=args.classifier,
                            out_path=Path(args.out))


def cmd_memorisation(args):
    from dpdm import memorisation

    from dpdm import config as cfg

    memorisation.check_memorisation(Path(args.samples), Path(args.train), Path(args.test), Path(args.out),
                                    Path(args.pairs), settings=_read_json_arg(args.settings) if args.settings else None,
                                    alpha=args.alpha, neighbours=args.neighbours, extractor=args.extractor,
                                    weights_path=cfg.env_or(args.weights, "DPDM_FID_WEIGHTS"), device=args.device)


def cmd_audit(args):
    from dpdm import audit, data
    from dpdm.artifacts import save_json

    n = int(data.load_meta(Path(args.data))["counts"]["train"])
    result = audit.audit_cell(_settings(args), n, canaries=args.canaries, k_pos=args.k_pos, k_neg=args.k_neg,
                              confidence=args.confidence, seed=args.audit_seed, test_only_break=args.test_only_break)
    save_json(Path(args.out), result)
    log.info("audit of %s: %d of %d guesses correct -> eps >= %.3f at %g%% confidence (accountant: eps = %.3f)%s",
             result["cell"], result["correct"], result["guesses"], result["eps_lower_bound"],
             100 * result["confidence"], result["eps_accountant"],
             f" [TEST ONLY: mechanism broken: {args.test_only_break}]" if args.test_only_break else "")
    audit.check_audit(result)


def cmd_report_audit(args):
    from dpdm import report

    report.build_audit_report([Path(p) for p in args.inputs], out_dir=Path(args.out))


def cmd_report(args):
    from dpdm import report

    report.build_report(report.read_manifest(args.manifest), out_dir=Path(args.out), loss_curves=args.loss_curves)


def cmd_report_ablation(args):
    from dpdm import report

    report.build_ablation_report(_read_json_arg(args.manifest, "--manifest"), out_dir=Path(args.out))


def cmd_check_config(args):
    from dpdm import config as cfg
    from dpdm import launch

    files = args.files or [cfg.PACKAGE_DIR.parent / "config" / "config.yaml"]
    config = cfg.load_config(files, args.overrides)
    print(f"{', '.join(map(str, files))}: valid")
    print(cfg.grid_summary(config, cfg.plan_grid(config)) + launch.describe(cfg.train_resources(config)))


def cmd_bench(args):
    from dpdm import bench

    bench.main(args)


def cmd_gpu_check(args):
    from dpdm import gpucheck

    gpucheck.main(args)


def args_gpu_check(p: argparse.ArgumentParser) -> None:
    """gpu-check's options (dpdm.gpucheck): only `gpu-check` builds them."""
    from dpdm.gpucheck import add_arguments

    add_arguments(p)


def args_bench(p: argparse.ArgumentParser) -> None:
    """bench's options (defined in dpdm.bench, which imports torch): only `bench` builds them."""
    from dpdm.bench import add_arguments

    add_arguments(p)


# Long but flat: one block of options per command, read top to bottom.
def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; `command` (the one being run; None: all) skips other commands' heavy options."""
    parser = argparse.ArgumentParser(prog="python -m dpdm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="raw files -> data/{dataset}/{train,test}.npz + meta.json")
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True, help="output folder, e.g. data/mnist")
    p.add_argument("--raw-dir", help="folder of raw files (env DPDM_RAW_DIR overrides)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading missing raw files")
    p.add_argument("--digits-size", type=int, default=28, choices=[8, 16, 28])
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("fetch-weights", help="download pytorch-fid's Inception weights (needs the internet)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_fetch_weights)

    def add_fid_args(p):
        p.add_argument("--extractor", default="inception", choices=["inception", "untrained"],
                       help="'untrained' = random weights, for offline TESTS ONLY")
        p.add_argument("--weights", help="Inception weights file (env DPDM_FID_WEIGHTS overrides)")
        p.add_argument("--batch-size", type=positive_int, default=200)
        p.add_argument("--device", default="auto")

    p = sub.add_parser("fid-ref", help="Inception statistics of a real split")
    p.add_argument("--data", required=True, help="prepared dataset folder, e.g. data/mnist")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--num-images", type=positive_int, help="use the split's first N images (default: all)")
    p.add_argument("--keep-features", type=int, default=0, metavar="N",
                   help="also store the features of the first N images (precision / recall; default 0: none)")
    p.add_argument("--out", required=True)
    add_fid_args(p)
    p.set_defaults(func=cmd_fid_ref)

    p = sub.add_parser("fid", help="FID of a samples .npz against reference statistics")
    p.add_argument("--samples", required=True)
    p.add_argument("--ref", required=True, action="append",
                   help="reference statistics (fid-ref); repeat for several splits, the first is the headline FID")
    p.add_argument("--out", required=True)
    p.add_argument("--num-samples", type=positive_int, help="use the first N samples (default: all)")
    p.add_argument("--prdc-k", type=positive_int, metavar="K",
                   help="also precision / recall and density / coverage with K neighbours (the references need "
                        "their features: fid-ref --keep-features)")
    p.add_argument("--settings", help="cell settings to record in the result (JSON string or file)")
    add_fid_args(p)
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("train", help="train one cell's DP diffusion model")
    _add_settings_args(p)
    p.add_argument("--data", required=True, help="prepared dataset folder, e.g. data/mnist")
    p.add_argument("--out", required=True, help="cell folder: model.pt, privacy.json, train_metrics.csv")
    p.add_argument("--checkpoint-dir", help="where to keep resumable checkpoints (default: OUT/checkpoints)")
    p.add_argument("--log-file", help="also append the log here, one numbered header per attempt (the workflow: "
                                      "logs/train_attempts.log)")
    p.add_argument("--stop-with-parent", action="store_true",
                   help="checkpoint and exit when the parent process dies (the workflow's jobs: no orphans)")
    p.add_argument("--init", help="the public model to fine-tune (the cell's train.init.pretrained: "
                                  "results/pretrain/NAME/model.pt)")
    p.add_argument("--procs-per-node", type=positive_int, default=1, metavar="P",
                   help="processes per node (one per GPU): more than one in all runs this command under torchrun "
                        "(dpdm/launch.py; the workflow passes resources.train's count)")
    p.add_argument("--nodes", type=positive_int, default=1, metavar="N",
                   help="nodes (inside a SLURM allocation: srun + torchrun's c10d rendezvous)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", help="train a public model without privacy (for DP fine-tuning)")
    g = p.add_argument_group("settings (either --settings, or --config with --name)")
    g.add_argument("--settings", help="resolved settings of the public model: a JSON string or a .json file")
    g.add_argument("--config", action="append", default=[], help="config YAML (repeatable; later files win)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--name", help="a name of the config's pretrain section")
    p.add_argument("--data", required=True, help="the PUBLIC dataset's prepared folder")
    p.add_argument("--out", required=True, help="results/pretrain/NAME: model.pt, pretrain.json, train_metrics.csv")
    p.add_argument("--log-file", help="also append the log here, one numbered header per attempt")
    p.add_argument("--stop-with-parent", action="store_true",
                   help="checkpoint and exit when the parent process dies (the workflow's jobs)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sample", help="generate samples from a trained model")
    _add_settings_args(p)
    p.add_argument("--model", required=True)
    p.add_argument("--sampler", required=True, help="a sampler name from the cell's settings.samplers")
    p.add_argument("--out", required=True, help="samples_{sampler}.npz")
    p.add_argument("--grid", help="grid_{sampler}.png")
    p.add_argument("--num-samples", type=positive_int)
    p.add_argument("--batch-size", type=positive_int)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("classify", help="train a classifier on samples, test on the real test set")
    _add_settings_args(p)
    p.add_argument("--samples", required=True)
    p.add_argument("--test", required=True, help="real test split, e.g. data/mnist/test.npz")
    p.add_argument("--classifier", required=True, choices=CLASSIFIERS)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("judge-fit", help="train the judge: a classifier on the REAL training split (private)")
    p.add_argument("--data", required=True, help="prepared dataset folder, e.g. data/mnist")
    p.add_argument("--classifier", default="cnn", choices=CLASSIFIERS)
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--out", required=True, help="judge file, e.g. data/mnist/judge_cnn.pt (private)")
    p.set_defaults(func=cmd_judge_fit)

    p = sub.add_parser("judge", help="the judge's accuracy on class-conditional samples (not covered by DP)")
    _add_settings_args(p)
    p.add_argument("--judge", required=True)
    p.add_argument("--samples", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser("baseline", help="DP-SGD classifier trained on real data (paper Table 2)")
    _add_settings_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--classifier", required=True, choices=CLASSIFIERS)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("memorisation", help="nearest training and test images of every sample; near-copies "
                                            "(Carlini et al. 2023); NOT covered by DP")
    p.add_argument("--samples", required=True)
    p.add_argument("--train", required=True, help="the prepared training split (private)")
    p.add_argument("--test", required=True, help="the prepared test split")
    p.add_argument("--out", required=True, help="memorisation_<sampler>.json")
    p.add_argument("--pairs", required=True, help="the figure of the closest pairs (shows training images: private)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--neighbours", type=positive_int, default=50)
    p.add_argument("--settings", help="cell settings to record in the result (JSON string or file)")
    p.add_argument("--extractor", choices=["inception", "untrained"],
                   help="also in this feature space (FID's Inception; 'untrained' for tests only)")
    p.add_argument("--weights", help="Inception weights file (env DPDM_FID_WEIGHTS overrides)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_memorisation)

    p = sub.add_parser("audit", help="one-run privacy audit of a cell's mechanism (gradient canaries): an "
                                     "empirical epsilon lower bound, a failure if above the accountant's")
    _add_settings_args(p)
    p.add_argument("--data", required=True, help="the prepared dataset (its meta.json gives the training set's size)")
    p.add_argument("--out", required=True, help="audit.json")
    p.add_argument("--canaries", type=positive_int, default=1000, help="m canaries, each included by a fair coin")
    p.add_argument("--k-pos", type=int, default=100, help="guess 'included' for the k+ highest scores")
    p.add_argument("--k-neg", type=int, default=100, help="guess 'excluded' for the k- lowest scores")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--audit-seed", type=int, help="fix the coins and the noise (tests; NOT secret; default: secret)")
    p.add_argument("--test-only-break", metavar="HOW",
                   help="TEST ONLY: break the mechanism on purpose, the audit must then fail (no-noise or no-clip: "
                        "dpdm.audit.TEST_ONLY_BREAKS)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("report-audit", help="audit.json files -> tables/audit and figures/audit")
    p.add_argument("--out", required=True, help="results folder: writes OUT/tables/audit.*, OUT/figures/audit.*")
    p.add_argument("inputs", nargs="+", help="audit.json files")
    p.set_defaults(func=cmd_report_audit)

    p = sub.add_parser("report", help="result JSONs -> LaTeX/CSV tables and figures")
    p.add_argument("--out", required=True, help="results folder: writes OUT/tables and OUT/figures")
    p.add_argument("--loss-curves", action="store_true",
                   help="opt in to figures/loss_curves from the cells' private/train_metrics.csv (training losses "
                        "are NOT covered by the DP guarantee; config report.loss_curves)")
    p.add_argument("--manifest", required=True,
                   help="JSON file listing every input and what it is (the workflow writes it: "
                        "{results}/tables/report_inputs.json; entries as dpdm.layout.Entry)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("report-ablation", help="one ablation's table and figure (paper Tables 3, 5, 6)")
    p.add_argument("--out", required=True, help="results folder: reads the cells under it, writes OUT/tables, OUT/figures")
    p.add_argument("--manifest", required=True, help="the ablation's rows (dpdm.config.plan_grid): JSON string or file")
    p.set_defaults(func=cmd_report_ablation)

    p = sub.add_parser("check-config", help="validate config files as the workflow reads them (names the line of "
                                             "a YAML error) and say what they would train")
    p.add_argument("files", nargs="*", help="config files in --configfile order (default: config/config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("bench", help="DP-SGD step vs non-private and hook-based steps; sampling; FID features")
    if command in (None, "bench"):
        args_bench(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("gpu-check", help="the GPU measurements in one command: the step benchmark at B = 4096, "
                                         "K = 32, DP training steps projected to GPU-hours of the grid, sampling "
                                         "in fp32 / TF32 / bf16 / channels-last / compile (--quick: CPU miniature)")
    if command in (None, "gpu-check"):
        args_gpu_check(p)
    p.set_defaults(func=cmd_gpu_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # -v is the only global option
    args = build_parser(command).parse_args(argv)
    args.argv = argv  # what `train` reruns under torchrun
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    keep_freed_memory()
    try:
        args.func(args)
    except DPDMError as e:  # bad input: one line, exit status 2 (as argparse's own errors)
        if args.verbose:
            traceback.print_exc()
        print(f"dpdm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: the traceback with -v or DPDM_TRACEBACK=1 (the workflow's logs)
        if args.verbose or os.environ.get("DPDM_TRACEBACK"):
            traceback.print_exc()
        print(f"dpdm {args.command}: internal error: {type(e).__name__}: {e} (this is a bug, not your input; "
              "rerun with -v for the traceback and report it)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
