"""Config loading, merging, validation and cell resolution (dpdm/config.py + schema)."""


import pytest

from dpdm import config as cfg
from dpdm.artifacts import DPDMError
from helpers import REPO  # tests/helpers.py

PAPER = REPO / "config" / "config.yaml"
SMOKE = REPO / "config" / "smoke.yaml"


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_shipped_configs_are_valid():
    cfg.load_config([])
    cfg.load_config([PAPER])
    cfg.load_config([PAPER, SMOKE])
    cfg.load_config([SMOKE])
    laptop = cfg.load_config([REPO / "config" / "laptop.yaml"])
    assert laptop["ablations"] == {} and not laptop["fid"]["enabled"]  # alone: none of the paper's ablations
    assert {ds for ds, _, _ in cfg.iter_cells(laptop)} == {"mnist", "fashion_mnist"}
    assert cfg.resolve_cell(laptop, "mnist", 1, 0)["privacy"]["delta"] == 1e-5


def test_paper_grid_cells_and_per_cell_settings():
    c = cfg.load_config([PAPER])
    cells = cfg.iter_cells(c)
    assert len(cells) == 8  # MNIST x3, Fashion-MNIST x3, CelebA x2
    assert ("celeba32", 1.0, 0) in cells
    mnist02 = cfg.resolve_cell(c, "mnist", 0.2, 0)
    mnist10 = cfg.resolve_cell(c, "mnist", 10, 0)
    assert mnist02["diffusion"]["precond"] == "v"
    assert mnist10["diffusion"]["precond"] == "edm"
    assert mnist10["train"]["batch_size"] == 4096 and mnist10["train"]["epochs"] == 300
    assert mnist10["train"]["noise_multiplicity"] == 32 and mnist10["privacy"]["clip"] == 1.0
    assert mnist10["privacy"]["delta"] == 1e-5 and mnist10["privacy"]["target_eps"] == 10.0
    assert set(mnist10["samplers"]) == {"fid", "acc"}  # samplers replace the defaults' set
    celeba = cfg.resolve_cell(c, "celeba32", 1, 0)
    assert celeba["train"]["batch_size"] == 2048 and celeba["privacy"]["delta"] == 1e-6
    assert celeba["model"]["attn_resolutions"] == [8, 16]
    assert mnist10["cell"] == {"dataset": "mnist", "eps": 10.0, "eps_tag": "eps10", "seed": 0}


def test_smoke_overrides_replace_the_grid():
    c = cfg.load_config([PAPER, SMOKE])
    assert {ds for ds, _, _ in cfg.iter_cells(c)} == {"digits"}
    assert c["fid"]["extractor"] == "untrained"


def test_eps_tags():
    assert [cfg.eps_tag(e) for e in (0.2, 1, 1.0, 10)] == ["eps0.2", "eps1", "eps1", "eps10"]
    assert cfg.parse_eps("eps0.2") == 0.2 and cfg.parse_eps("10") == 10.0


@pytest.mark.parametrize(
    "text, key",
    [
        ("bogus: 1\n", "bogus"),
        ("defaults:\n  train:\n    lr: fast\n", "defaults.train.lr"),
        ("defaults:\n  train:\n    learning_rate: 0.1\n", "defaults.train.learning_rate"),
        ("defaults:\n  privacy:\n    delta: 2\n", "defaults.privacy.delta"),
        ("experiments:\n  - {dataset: mnist, eps: [-1]}\n", "experiments.0.eps.0"),
        ("experiments:\n  - {dataset: mnist, eps: [1, 1000000]}\n", "experiments.0.eps.1"),
        ("defaults:\n  model:\n    dropout: 0.1\n", "defaults.model.dropout"),
        ("defaults:\n  samplers:\n    fid: {kind: euler}\n", "defaults.samplers.fid.kind"),
        ("fid:\n  extractor: resnet\n", "fid.extractor"),
        ("fid:\n  reference_split: validation\n", "fid.reference_split"),
        ("fid:\n  reference_split: [train, train]\n", "fid.reference_split"),
        ("report:\n  loss_curves: yes please\n", "report.loss_curves"),
    ],
)
def test_schema_rejects_bad_configs_naming_the_key(tmp_path, text, key):
    with pytest.raises(DPDMError) as e:
        cfg.load_config([write(tmp_path, text)])
    assert f"'{key}'" in str(e.value)


def test_unknown_dataset_is_named(tmp_path):
    with pytest.raises(DPDMError, match="imagenet"):
        cfg.load_config([write(tmp_path, "experiments:\n  - {dataset: imagenet, eps: [1]}\n")])
    with pytest.raises(DPDMError, match="unknown dataset 'svhn'"):
        cfg.resolve_cell(cfg.load_config([]), "svhn", 1, 0)


def test_nonpositive_eps_is_rejected():
    with pytest.raises(DPDMError, match="epsilon must be > 0"):
        cfg.resolve_cell(cfg.load_config([]), "mnist", 0, 0)


def test_merge_order_defaults_dataset_cell_variant(tmp_path):
    p = write(tmp_path, """
defaults: {train: {lr: 0.1, epochs: 7}}
datasets:
  mnist:
    settings: {train: {lr: 0.2}}
    cells:
      1: {train: {lr: 0.3}}
""")
    c = cfg.load_config([p])
    assert cfg.resolve_cell(c, "mnist", 10, 0)["train"]["lr"] == 0.2
    assert cfg.resolve_cell(c, "mnist", 1, 0)["train"]["lr"] == 0.3
    assert cfg.resolve_cell(c, "mnist", 1, 0)["train"]["epochs"] == 7
    assert cfg.resolve_cell(c, "mnist", 1, 0, variant={"train": {"lr": 0.4}})["train"]["lr"] == 0.4
    assert cfg.resolve_cell(c, "fashion_mnist", 1, 0)["train"]["lr"] == 0.1


def test_command_line_overrides_are_parsed_as_yaml():
    c = cfg.load_config([], ["defaults.train.epochs=2", "seeds=[0, 1]"])
    assert c["defaults"]["train"]["epochs"] == 2 and c["seeds"] == [0, 1]
    with pytest.raises(DPDMError, match="key.sub=value"):
        cfg.load_config([], ["nonsense"])


def test_settings_hash_is_stable():
    from dpdm.artifacts import sha256_json

    c = cfg.load_config([PAPER])
    a = cfg.resolve_cell(c, "mnist", 1, 0)
    b = cfg.resolve_cell(cfg.load_config([PAPER]), "mnist", 1, 0)
    assert sha256_json(a) == sha256_json(b)
    assert sha256_json(a) != sha256_json(cfg.resolve_cell(c, "mnist", 1, 1))


# ----------------------------------------------------------------------------
# The grid: main cells and ablation variants.


def test_paper_grid_trains_every_model_once():
    grid = cfg.plan_grid(cfg.load_config([PAPER]))
    paths = list(grid.cells)
    assert len(paths) == len(set(paths)) == 8 + 5 + 3
    assert {p for p in paths if p.count("/") == 3} == {
        f"mnist/eps1/K{k}/seed0" for k in (1, 2, 4, 8, 16)} | {f"mnist/eps0.2/{v}/seed0" for v in ("vp", "ve", "edm")}
    rows = {r["variant"]: r for r in grid.ablations["noise_multiplicity"]["rows"]}
    assert rows["K32"]["cell"] == "mnist/eps1/seed0" and rows["K8"]["cell"] == "mnist/eps1/K8/seed0"
    assert [rows[f"K{k}"]["x"] for k in (1, 2, 4, 8, 16, 32)] == [1, 2, 4, 8, 16, 32]
    assert {r["variant"]: r["cell"] for r in grid.ablations["parameterisation"]["rows"]}["v"] == "mnist/eps0.2/seed0"
    # The K8 model is the main eps-1 cell's settings with K = 8, nothing else.
    k8 = cfg.cell_settings(cfg.load_config([PAPER]), grid.cells["mnist/eps1/K8/seed0"])
    main = cfg.resolve_cell(cfg.load_config([PAPER]), "mnist", 1, 0)
    assert k8["train"] == dict(main["train"], noise_multiplicity=8) and k8["diffusion"] == main["diffusion"]
    assert k8["cell"]["variant"] == "K8" and list(k8["samplers"]) == ["sddim"]
    # Sampler ablation: churn-fid and ddim are the main cells' fid and acc (same settings).
    sampler_rows = grid.ablations["sampler"]["rows"]
    assert {(r["sampler"], r["cell_sampler"]) for r in sampler_rows} == {
        ("churn-fid", "fid"), ("churn-acc", "churn-acc"), ("sddim", "sddim"), ("ddim", "acc")}
    assert set(grid.cells["mnist/eps10/seed0"].samplers) == {"fid", "acc", "churn-acc", "sddim"}
    assert set(grid.cells["fashion_mnist/eps10/seed0"].samplers) == {"fid", "acc"}


def _ablation_config(tmp_path, body):
    return cfg.load_config([write(tmp_path, "experiments:\n  - {dataset: digits, eps: [1]}\nablations:\n" + body)])


def test_ablation_errors_name_the_problem(tmp_path):
    with pytest.raises(DPDMError, match=r"ablations.a'.samplers: variant 'x' has no sampler 'nope'"):
        cfg.plan_grid(_ablation_config(tmp_path, "  a: {dataset: digits, eps: [1], samplers: [nope],"
                                                 " variants: {x: {train: {lr: 0.1}}}}\n"))
    with pytest.raises(DPDMError, match="changes its sample/classify settings"):
        cfg.plan_grid(_ablation_config(tmp_path, "  a: {dataset: digits, eps: [1], variants: {x: {classify: {epochs: 1}}}}\n"))
    with pytest.raises(DPDMError, match="sampler 'ddim' of cell digits/eps1/seed0 already exists with other settings"):
        cfg.plan_grid(_ablation_config(tmp_path, "  a: {dataset: digits, eps: [1],"
                                                 " settings: {samplers: {ddim: {kind: ddim, steps: 7}}}}\n"))
    with pytest.raises(DPDMError, match=r"'ablations.a.variants'"):  # a variant folder may not look like seedN
        _ablation_config(tmp_path, "  a: {dataset: digits, eps: [1], variants: {seed1: {}}}\n")
    # Each ablation writes tables/<table>.tex: its own name, not the main report's or another's.
    with pytest.raises(DPDMError, match=r"'ablations.a.table' = 'table1' is already written by the main report"):
        cfg.plan_grid(_ablation_config(tmp_path, "  a: {dataset: digits, eps: [1], table: table1}\n"))
    with pytest.raises(DPDMError, match=r"'ablations.b.table' = 't3' is already written by ablation 'a'"):
        cfg.plan_grid(_ablation_config(tmp_path, "  a: {dataset: digits, eps: [1], table: t3}\n"
                                                 "  b: {dataset: digits, eps: [10], table: t3}\n"))
    # The privacy audits own {dataset}/eps{eps}/audit/ and tables/audit.*: no ablation may take them.
    with pytest.raises(DPDMError, match=r"a variant named 'audit' would share the folder .*audit/ of the privacy"):
        cfg.plan_grid(_ablation_config(tmp_path, "  a: {dataset: digits, eps: [1], variants: {audit: {}}}\n"))
    with pytest.raises(DPDMError, match=r"'ablations.a.table' = 'audit' is already written by the privacy audit"):
        cfg.plan_grid(_ablation_config(tmp_path, "  a: {dataset: digits, eps: [1], table: audit}\n"))


def test_a_later_config_replaces_an_ablation_whole(tmp_path):
    """Ablations do not blend across config files: smoke's K ablation is exactly its own."""
    c = cfg.load_config([PAPER, SMOKE])
    assert set(c["ablations"]["noise_multiplicity"]["variants"]) == {"K1", "K2"}
    assert "settings" not in c["ablations"]["noise_multiplicity"]
    gone = cfg.load_config([PAPER, write(tmp_path, "ablations: {sampler: null}\n")])
    assert set(gone["ablations"]) == {"noise_multiplicity", "parameterisation"}


def test_dependency_pins_agree():
    """pyproject.toml and environment.yml pin the same Snakemake and SLURM plugin (2.x: the
    profile's gpu / slurm_extra resources), and the conda environment brings graphviz's
    `dot`, which the README's rulegraph command needs."""
    import re

    pyproject = (REPO / "pyproject.toml").read_text()
    env = (REPO / "environment.yml").read_text()
    for name in ("snakemake", "snakemake-executor-plugin-slurm"):
        pins = {m for m in re.findall(rf'(?<![\w-]){name}([<>=!,.0-9]+)', pyproject + env)}
        assert len(pins) == 1, (name, pins)
    assert ">=2.0,<3" in pins.pop()
    assert re.search(r"^  - graphviz\b", env, re.M)


def test_documented_commands_put_targets_before_configfile():
    """`--configfile` swallows every word after it (Snakemake then fails with a traceback
    naming the target as a missing file): every documented command puts its targets first."""
    import re

    for doc in ("README.md", "config/README.md", "docs/results.md", "docs/benchmarks.md", "Snakefile"):
        for line in (REPO / doc).read_text().splitlines():
            if "as a file" in line or "snakemake " not in line.split("--configfile")[0]:  # prose, and
                continue  # README's example of the mistake itself
            for m in re.finditer(r"--configfile((?: +[^\s`#|&;>)]+)+)", line):
                words = m.group(1).split()
                for w in words:
                    if w.startswith("-"):
                        break
                    assert w.endswith((".yaml", ".yml", ".json")) or "{" in w, f"{doc}: '{w}' after --configfile: {line}"


def test_the_schema_agrees_with_the_registries():
    """Each name list is written once (dpdm.registry, dpdm.data.DATASETS); the schema's
    enums and each module's own table must match it."""
    from dpdm import classifiers, data, diffusion, privacy, registry, sampling

    schema = cfg.yaml_load(cfg.SCHEMA_FILE.read_text())
    defs = schema["$defs"]
    settings = defs["settings"]["properties"]
    assert sorted(defs["dataset_name"]["enum"]) == sorted(data.DATASETS)
    assert set(registry.CLASSIFIERS) == set(classifiers._BUILDERS)
    assert defs["classifier_list"]["items"]["enum"] == list(registry.CLASSIFIERS)
    assert settings["classify"]["properties"]["judge"]["oneOf"][1]["enum"] == list(registry.CLASSIFIERS)
    assert settings["diffusion"]["properties"]["precond"]["enum"] == list(registry.PRECONDS) == list(diffusion.PRECONDS)
    assert defs["sampler"]["properties"]["kind"]["enum"] == list(registry.SAMPLER_KINDS) == list(sampling.SAMPLERS)
    assert settings["privacy"]["properties"]["accountant"]["enum"] == list(privacy.ACCOUNTANTS)
    assert settings["privacy"]["properties"]["calibration"]["enum"] == list(privacy.CALIBRATIONS)


def test_the_readme_layout_shows_every_file_of_dpdm_layout():
    """README's Outputs block lists each file name dpdm/layout.py defines, so the two
    cannot drift apart."""
    from dpdm import layout

    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("## Outputs"):readme.index("## What the guarantee covers")]
    names = list(layout.CELL_FILES.values()) + ["baseline/eps{eps}/seed{seed}/{classifier}.json",
                                                layout.REPORT_MANIFEST, "eps{eps}/audit/seed{seed}/audit.json"]
    assert layout.AUDIT == "{dataset}/{eps}/audit/seed{seed}/audit.json"  # README writes eps{eps}
    assert layout.BASELINE == "{dataset}/baseline/{eps}/seed{seed}/{classifier}.json"  # README writes eps{eps}
    missing = [n for n in names if n not in block]
    assert not missing, f"README's layout block lacks {missing}"
