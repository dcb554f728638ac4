"""The oracles that need no training here: VADER's lexicon and any transformers sentiment classifier (see
`madpo.pipeline.oracle` for the interface and the TF-IDF default)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from madpo.pipeline.oracle import BaseOracle, prob_to_reward


class VaderOracle(BaseOracle):
    """reward = 3·compound of the VADER lexicon scorer (`pip install vaderSentiment`)."""

    name = "vader"

    def __init__(self) -> None:
        super().__init__()
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as e:
            raise ModuleNotFoundError(
                "the VADER oracle needs the PyPI package 'vaderSentiment': pip install vaderSentiment "
                "(or pip install 'madpo[pipeline]')"
            ) from e
        self._analyzer = SentimentIntensityAnalyzer()

    def _score(self, texts: list[str]) -> np.ndarray:
        return np.asarray([3.0 * self._analyzer.polarity_scores(t)["compound"] for t in texts], dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face sequence classifier
# ----------------------------------------------------------------------------------------------------------------


class HFClassifierOracle(BaseOracle):
    """Any transformers sentiment classifier: softmax over all classes, reward = 6·(P(`positive_label`) − 0.5).

    The paper's oracle is `cardiffnlp/twitter-roberta-base-sentiment-latest` (negative/neutral/positive). Batched,
    eval mode, no grad, inputs truncated to `max_length` tokens.
    """

    name = "hf_classifier"

    def __init__(
        self,
        model_name_or_path: str,
        positive_label: str = "positive",
        *,
        batch_size: int = 32,
        max_length: int = 512,
        device: str = "cpu",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model_name_or_path = str(model_name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name_or_path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.model_name_or_path, trust_remote_code=trust_remote_code
        ).to(device)
        self.model.eval()
        id2label = {int(i): str(lbl) for i, lbl in self.model.config.id2label.items()}
        matches = [i for i, lbl in id2label.items() if lbl.lower() == positive_label.lower()]
        if len(matches) != 1:
            raise ValueError(
                f"{self.model_name_or_path}: positive_label={positive_label!r} must name exactly one class; the "
                f"model's id2label is {id2label}"
            )
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token_id is None:
                raise ValueError(f"{self.model_name_or_path}: tokenizer has neither a pad nor an EOS token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.positive_index = matches[0]
        self.id2label = id2label
        self.batch_size = batch_size
        self.max_length = min(max_length, getattr(self.tokenizer, "model_max_length", max_length) or max_length)
        self.device = device

    def class_probs(self, texts: Sequence[str]) -> np.ndarray:
        """(n, num_labels) softmax probabilities, in input order (batched by length to save padding)."""
        import torch

        texts = list(texts)
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), len(self.id2label)), dtype=np.float64)
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                idx = order[start : start + self.batch_size]
                enc = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                logits = self.model(**enc).logits.float()
                out[idx] = torch.softmax(logits, dim=-1).double().cpu().numpy()
        return out

    def _score(self, texts: list[str]) -> np.ndarray:
        return prob_to_reward(self.class_probs(texts)[:, self.positive_index])

    def describe(self) -> dict:
        return {
            **super().describe(),
            "model": self.model_name_or_path,
            "positive_label": self.id2label[self.positive_index],
            "max_length": self.max_length,
        }


# ----------------------------------------------------------------------------------------------------------------
# factory
# ----------------------------------------------------------------------------------------------------------------
