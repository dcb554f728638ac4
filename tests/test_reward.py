import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from madpo.data import PreferenceDataModule
from madpo.modeling import pair_rewards
from madpo.modules import LoraOptions, RewardLightningModule
from tests.conftest import DATA, TINY_LLAMA


def _batch(n: int = 6) -> dict[str, torch.Tensor]:
    dm = PreferenceDataModule(
        train_files=str(DATA / "pairs_train.jsonl"),
        tokenizer=TINY_LLAMA,
        max_length=48,
        max_prompt_length=12,
        batch_size=n,
    )
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_bradley_terry_loss_and_metrics_match_hand_computation():
    torch.manual_seed(0)
    module = RewardLightningModule(TINY_LLAMA, center_rewards_coefficient=0.01)
    batch = _batch()
    loss, stats, _ = module.compute(batch, "train")
    rewards = pair_rewards(module.model, batch["input_ids"], batch["attention_mask"]).tolist()
    n = batch["index"].numel()
    expected = (
        sum(
            -math.log(1 / (1 + math.exp(-(rewards[i] - rewards[n + i])))) + 0.01 * (rewards[i] + rewards[n + i]) ** 2
            for i in range(n)
        )
        / n
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["accuracy"].tolist() == [float(rewards[i] > rewards[n + i]) for i in range(n)]
    assert stats["margin"].tolist() == pytest.approx([rewards[i] - rewards[n + i] for i in range(n)], rel=1e-5)


def test_reward_is_read_at_the_last_real_token_not_the_padding():
    module = RewardLightningModule(TINY_LLAMA).eval()
    batch = _batch()
    rewards = pair_rewards(module.model, batch["input_ids"], batch["attention_mask"])
    longest = int(batch["attention_mask"].sum(1).argmin())  # a padded row
    length = int(batch["attention_mask"][longest].sum())
    alone = pair_rewards(
        module.model,
        batch["input_ids"][longest : longest + 1, :length],
        batch["attention_mask"][longest : longest + 1, :length],
    )
    torch.testing.assert_close(rewards[longest : longest + 1], alone, rtol=1e-5, atol=1e-5)


def test_lora_reward_model_trains_adapter_and_head_and_exports_merged(tmp_path):
    torch.manual_seed(0)
    module = RewardLightningModule(TINY_LLAMA, lora=LoraOptions(r=4, alpha=8, dropout=0.0))
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    frozen = {n: p.clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    batch = _batch()
    loss, _, _ = module.compute(batch, "train")
    loss.backward()
    torch.optim.SGD([p for p in module.model.parameters() if p.requires_grad], lr=0.5).step()
    for n, p in module.model.named_parameters():
        if n in frozen:
            assert p.equal(frozen[n]), n
    module.export(str(tmp_path / "rm"))
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    module.model.eval()
    with torch.no_grad():
        ours = pair_rewards(module.model, batch["input_ids"], batch["attention_mask"])
        theirs = pair_rewards(plain, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def _padded(rows: list[list[int]], pad: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids, mask = [], []
    for r in rows:
        fill = [pad] * (width - len(r))
        ids.append(r + fill if side == "right" else fill + r)
        mask.append([1] * len(r) + [0] * len(fill) if side == "right" else [0] * len(fill) + [1] * len(r))
    return torch.tensor(ids), torch.tensor(mask)


@pytest.mark.parametrize("side", ["right", "left"])
def test_mean_pooling_is_the_masked_mean_of_hidden_states_through_the_head(side):
    torch.manual_seed(0)
    module = RewardLightningModule(TINY_LLAMA, pooling="mean").eval()
    assert module.model.config.madpo_reward_pooling == "mean"
    rows = [[1, 5, 9, 14, 22, 7], [1, 30, 8]]
    ids, mask = _padded(rows, 0, side)
    with torch.no_grad():
        rewards = pair_rewards(module.model, ids, mask)
        hidden = module.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = []
        for i, row in enumerate(rows):
            real = hidden[i][mask[i].bool()]
            assert real.shape[0] == len(row)
            expected.append(module.model.score(real.sum(0) / len(row)).item())
        last = RewardLightningModule(TINY_LLAMA).eval()
        last.model.load_state_dict(module.model.state_dict())
        last_rewards = pair_rewards(last.model, ids, mask)
    torch.testing.assert_close(rewards, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(rewards, last_rewards)  # the same weights, read the other way
    if side == "right":  # causal attention: padding after a row changes none of its hidden states
        for i, row in enumerate(rows):
            with torch.no_grad():
                alone = pair_rewards(module.model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))
            torch.testing.assert_close(alone, rewards[i : i + 1], rtol=1e-5, atol=1e-6)


def test_pooling_is_saved_with_the_reward_model_and_scoring_reads_it(tmp_path):
    from madpo.modeling import load_tokenizer, reward_pooling
    from madpo.scoring import open_reward_model

    torch.manual_seed(0)
    module = RewardLightningModule(TINY_LLAMA, pooling="mean").eval()
    module.export(str(tmp_path / "rm"))
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["madpo_reward_pooling"] == "mean"
    batch = _batch()
    with open_reward_model(str(tmp_path / "rm"), load_tokenizer(TINY_LLAMA)) as reopened, torch.no_grad():
        assert reward_pooling(reopened) == "mean"
        theirs = pair_rewards(reopened, batch["input_ids"], batch["attention_mask"])
        ours = pair_rewards(module.model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pooling must be one of"):
        RewardLightningModule(TINY_LLAMA, pooling="max")
