"""The real-model configs parse and run through the real from_pretrained path, pointed at local directories."""

from __future__ import annotations

import glob

import pytest
import yaml

from madpo.cli import cli_main
from madpo.modeling import load_causal_lm
from tests.conftest import DATA, REPO, TINY_LLAMA

LOCAL = [
    f"--model.init_args.model_name_or_path={TINY_LLAMA}",
    f"--data.train_files={DATA / 'pairs_train.jsonl'}",
    f"--data.val_files={DATA / 'pairs_val.jsonl'}",
    "--data.max_length=64",
    "--data.max_prompt_length=16",
    "--data.batch_size=4",
    "--trainer.fast_dev_run=2",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
]


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "configs" / "**" / "*.yaml"), recursive=True)))
def test_every_config_is_valid_yaml(path):
    with open(path) as f:
        assert isinstance(yaml.safe_load(f), dict)


def test_paper_reward_config_runs_on_a_local_directory(tmp_path):
    cli_main(
        [
            "fit",
            "-c",
            str(REPO / "configs/imdb/reward.yaml"),
            *LOCAL,
            f"--data.cache_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--model.init_args.export_dir={tmp_path / 'rm'}",
        ]
    )
    assert (tmp_path / "rm" / "model.safetensors").exists()


def test_paper_madpo_config_runs_with_an_sft_adapter(tmp_path, random_reward_model):
    from peft import LoraConfig, get_peft_model

    adapter = tmp_path / "sft-adapter"
    sft = get_peft_model(
        load_causal_lm(TINY_LLAMA),
        LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]),
    )
    sft.save_pretrained(adapter)
    cli_main(
        [
            "fit",
            "-c",
            str(REPO / "configs/imdb/madpo.yaml"),
            *LOCAL,
            f"--data.cache_dir={tmp_path}",
            f"--model.init_args.lora.adapter_path={adapter}",
            f"--data.reward_model={random_reward_model}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--model.init_args.export_dir={tmp_path / 'policy'}",
        ]
    )
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")  # LoRA merged: plain transformers loads it
    assert not any("lora" in name for name, _ in merged.named_parameters())
