"""The names the whole pipeline agrees on, each written once (datasets: dpdm.data.DATASETS).

Config schema enums, CLI choices, workflow wildcards and report columns use these;
tests/test_config.py checks the schema against them and each module's own table.
"""

CLASSIFIERS = ("logreg", "mlp", "cnn", "wrn-16-4", "wrn-28-10")  # dpdm.classifiers builds each
PRECONDS = ("edm", "v", "vp", "ve")  # dpdm.diffusion.PRECONDS: the preconditioning classes
SAMPLER_KINDS = ("ddim", "stochastic_ddim", "edm")  # dpdm.sampling.SAMPLERS
