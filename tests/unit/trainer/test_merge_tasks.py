"""A merge of two LoRA adapters, each trained on its own tiny task, keeps most of what
each adapter learned: the merge pod's result measured, not just its formula."""

from __future__ import annotations

import random

import pytest
import torch
from kubetune_trainer import merging
from kubetune_trainer.export import weights_digest
from kubetune_trainer.tiny import build_causal

from kubetune.api.merge import MergeConfig, MergeParent

# Two fixed mappings, each with its own prompt, items and answer words; two words per answer.
COLORS = ["red", "green", "blue", "yellow", "black", "white", "cat", "dog", "bird", "fish"]
PLACES = ["paris", "london", "rome", "berlin", "madrid", "tokyo", "one", "two", "three", "four"]
ITEMS_A = ["horse", "cow", "sheep", "sun", "moon", "star", "sea", "river", "mountain", "day"]
ITEMS_B = [
    "france",
    "england",
    "italy",
    "germany",
    "spain",
    "japan",
    "question",
    "answer",
    "model",
    "data",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
STEPS, LEARNING_RATE, RANK = 120, 2e-3, 8
KEPT = 0.7  # the merge keeps at least this much of each adapter's gain on its own task


def task(prompt: str, items: list[str], words: list[str], seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(prompt.format(x), f" {rng.choice(words)} {rng.choice(words)}") for x in items]


TASKS = {
    "A": task("the color of the {} is", ITEMS_A, COLORS, 1),
    "B": task("Q: {}\nA:", ITEMS_B, PLACES, 2),
}


@pytest.fixture(scope="module")
def one_thread():
    """Matrices this small gain nothing from threads, and on a busy machine they spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, one_thread):
    # 512 wide rather than the usual 64: in a random model that narrow, the two tasks'
    # hidden states overlap so much that any two independently trained adapters fight
    # (a real model's residual stream is wide, and fine-tuning deltas small against it).
    return build_causal(tmp_path_factory.mktemp("wide") / "base", hidden=512)


def encode(tokenizer, prompt: str, answer: str) -> dict:
    """Prompt and answer tokens, and labels on the answer's tokens only."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return {
        "input_ids": prompt_ids + answer_ids + [tokenizer.eos_token_id],
        "labels": [-100] * len(prompt_ids) + answer_ids + [-100],
    }


def collate(tokenizer, rows: list[dict]) -> dict:
    width = max(len(r["input_ids"]) for r in rows)
    return {
        "input_ids": torch.tensor(
            [
                r["input_ids"] + [tokenizer.pad_token_id] * (width - len(r["input_ids"]))
                for r in rows
            ]
        ),
        "labels": torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows]),
        "attention_mask": torch.tensor(
            [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]
        ),
    }


def train_adapter(base_dir, tokenizer, pairs, folder, seed: int):
    """A LoRA adapter trained on one task with the transformers Trainer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=TARGETS)
    model = get_peft_model(model, lora)
    rows = [encode(tokenizer, p, a) for p, a in pairs]
    arguments = TrainingArguments(
        output_dir=str(folder.with_name(f"{folder.name}-checkpoints")),
        max_steps=STEPS,
        per_device_train_batch_size=len(rows),
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_steps=STEPS,
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=rows * STEPS,
        data_collator=lambda batch: collate(tokenizer, batch),
    )
    trainer.train()
    model.save_pretrained(folder)
    return folder


def accuracy(model, tokenizer, pairs) -> float:
    """Token accuracy of the answers under teacher forcing."""
    batch = collate(tokenizer, [encode(tokenizer, p, a) for p, a in pairs])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    predicted, targets = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
    answer = targets != -100
    return (predicted[answer] == targets[answer]).float().mean().item()


def test_merged_adapters_keep_both_tasks(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    folders = {
        name: train_adapter(base_dir, tokenizer, pairs, tmp_path / name, seed)
        for seed, (name, pairs) in enumerate(TASKS.items(), start=1)
    }
    # svd, not ties: svd merges the adapters' weight updates B_i A_i themselves (at rank
    # r1 + r2 their exact sum), while ties (like linear) combines the A and B factors
    # element by element, and two independently trained adapters' factors share no basis,
    # so the product picks up cross terms B_a A_b. ties is measured too: it keeps less,
    # and how much varies with the seeds far more than svd's share does.
    models = {"base": AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)}
    for name, folder in folders.items():
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        models[name] = PeftModel.from_pretrained(base, folder)
    for method, settings in (("svd", {"svd_rank": 2 * RANK}), ("ties", {"density": 0.5})):
        output = tmp_path / method
        config = MergeConfig(
            name=method,
            base_model=str(base_dir),
            parents=[
                MergeParent(
                    name=name,
                    path=str(folder),
                    kind="adapter",
                    weight=1.0,
                    digest=weights_digest(folder),
                )
                for name, folder in folders.items()
            ],
            method=method,
            format="adapter",
            output=str(output),
            **settings,
        )
        merging.run(config)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        models[f"merged ({method})"] = PeftModel.from_pretrained(base, output)

    scores = {
        model_name: {task: accuracy(model, tokenizer, pairs) for task, pairs in TASKS.items()}
        for model_name, model in models.items()
    }
    print("\nanswer-token accuracy  task A  task B")
    for model_name, by_task in scores.items():
        print(f"{model_name:<22} {by_task['A']:6.3f}  {by_task['B']:6.3f}")
    for name in TASKS:
        gain = scores[name][name] - scores["base"][name]
        kept = scores["merged (svd)"][name] - scores["base"][name]
        print(f"task {name}: svd merge keeps {kept / gain:.0%} of adapter {name}'s gain")
        assert scores[name][name] >= 0.9, f"adapter {name} did not learn its task"
        assert kept >= KEPT * gain, f"the merge lost task {name}"
        # The other adapter alone keeps next to nothing of this task's gain: a merge that
        # lost either adapter would fail above.
        other = next(o for o in TASKS if o != name)
        assert scores[other][name] - scores["base"][name] < 0.3 * gain
