"""The launchers and configs without a cluster: every examples/configs model x method gives a
command line the trainer accepts, on one node and on several; the scripts parse."""

import os
import subprocess

import pytest

from conftest import REPO_ROOT

MODELS = {"bert_base": (12, 768, 512), "bert_large": (24, 1024, 512),
          "roberta_base": (12, 768, 8192), "roberta_large": (24, 1024, 8192)}
METHODS = ["vanilla", "3ml", "token-drop", "sctd", "random-ltd"]


def _config_args(model, method, **env):
    script = f'source examples/configs/{model}.sh && printf "%s\\0" "${{EFFMLM_ARGS[@]}}"'
    r = subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                       env=dict(os.environ, METHOD=method, DATA="data/wiki", TOK="tok", **env))
    assert r.returncode == 0, r.stderr
    return r.stdout.split("\0")[:-1]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_example_configs_are_valid_for_one_and_several_nodes(model):
    from megatron_effmlm.arguments import config_from_args, build_parser
    from megatron_effmlm.config import check_layout

    layers, hidden, gbs = MODELS[model]
    for method in METHODS:
        argv = _config_args(model, method)
        assert "--bf16" in argv and "--exit-signal-handler" in argv
        a = build_parser().parse_args([x for x in argv if x != "--bf16"])  # CPU here: no bf16
        cfg = config_from_args(a)
        assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.seq_length) == (layers, hidden, 512)
        assert cfg.train.global_batch_size == gbs and cfg.train.save == cfg.train.load
        assert cfg.train.method == method
        for nodes in (1, 2, 4):  # 8 GPUs per node
            assert check_layout(cfg, 8 * nodes) == 8 * nodes
    # the papers' numbers (docs/methods.md)
    a = config_from_args(build_parser().parse_args([x for x in _config_args(model, "3ml") if x != "--bf16"]))
    assert a.data.mask_prob == 0.5 and a.data.no_mask_80_10_10 and a.model.decoder_layers == 2
    a = config_from_args(build_parser().parse_args([x for x in _config_args(model, "sctd") if x != "--bf16"]))
    assert a.train.method_options["td_beta"] == 0.95 and a.train.method_options["sctd_interval"] == 10
    a = config_from_args(build_parser().parse_args([x for x in _config_args(model, "token-drop") if x != "--bf16"]))
    assert a.train.method_options == {"td_keep_ratio": 0.5, "td_beta": 0.995}


def test_unknown_method_in_a_config_is_refused():
    r = subprocess.run(["bash", "-c", "source examples/configs/bert_base.sh"], cwd=REPO_ROOT, capture_output=True,
                       text=True, env=dict(os.environ, METHOD="nope", DATA="d", TOK="t"))
    assert r.returncode == 2
    assert r.stderr.strip() == "METHOD=nope: choose vanilla, 3ml, token-drop, sctd or random-ltd"


@pytest.mark.parametrize("script", ["slurm/pretrain_torchrun.sbatch", "slurm/pretrain_srun.sbatch",
                                    "slurm/torchrun_node.sh", "slurm/lib.sh", "examples/pretrain_one_node.sh"])
def test_scripts_parse(script):
    r = subprocess.run(["bash", "-n", script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = open(os.path.join(REPO_ROOT, script)).read()
    if script.endswith(".sbatch"):
        for line in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                     "#SBATCH --output=logs/%x-%j.out"):
            assert line in text
