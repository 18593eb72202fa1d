"""Training with transformers' Trainer and PEFT: the loss goes down, gradient checkpointing and resuming change
nothing, packed batches give the padded batch's loss, a LoRA adapter trains, saves and loads."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments

from modeling_longnet import LongNetConfig, LongNetForCausalLM

# transformers 5.24 renamed TrainingArguments' gradient_checkpointing (5.17, the oldest we support, has only that name)
CHECKPOINTING = (
    "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)


def counting_dataset(rows=64, length=24, vocab=128, seed=0):
    """Each row counts up from a random start (mod the vocabulary): learnable in a few steps."""
    starts = torch.randint(3, vocab, (rows, 1), generator=torch.Generator().manual_seed(seed))
    ids = 3 + (starts - 3 + torch.arange(length)) % (vocab - 3)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def tiny_model(**overrides):
    torch.manual_seed(0)
    return LongNetForCausalLM(LongNetConfig.from_preset("tiny", **overrides))


def training_args(output_dir, **overrides):
    args = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        max_steps=12,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
    )
    args.update(overrides)
    return TrainingArguments(**args)


def logged_losses(trainer):
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


@pytest.mark.transformers_versions
def test_trainer_lowers_the_loss_with_and_without_gradient_checkpointing(tmp_path):
    plain = Trainer(model=tiny_model(), args=training_args(tmp_path / "plain"), train_dataset=counting_dataset())
    plain.train()
    losses = logged_losses(plain)
    assert losses[12] < 0.5 * losses[1]
    checkpointed = Trainer(
        model=tiny_model(),
        train_dataset=counting_dataset(),
        args=training_args(
            tmp_path / "checkpointed", **{CHECKPOINTING: True, f"{CHECKPOINTING}_kwargs": {"use_reentrant": False}}
        ),
    )
    checkpointed.train()
    assert getattr(checkpointed.model, f"is_{CHECKPOINTING}")  # the Trainer turned it on
    for step, loss in logged_losses(checkpointed).items():  # same gradients, hence the same trajectory
        assert loss == pytest.approx(losses[step], rel=1e-4), step


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.transformers_versions
def test_resuming_from_a_checkpoint_continues_with_the_same_losses(tmp_path):
    kwargs = dict(max_steps=8, save_strategy="steps", save_steps=4, lr_scheduler_type="linear")
    uninterrupted = Trainer(
        model=tiny_model(), args=training_args(tmp_path / "a", **kwargs), train_dataset=counting_dataset()
    )
    uninterrupted.train()
    first = Trainer(
        model=tiny_model(),
        args=training_args(tmp_path / "b", **kwargs),
        train_dataset=counting_dataset(),
        callbacks=[StopAt(4)],
    )
    first.train()
    assert (tmp_path / "b" / "checkpoint-4").is_dir()
    resumed = Trainer(
        model=tiny_model(), args=training_args(tmp_path / "b", **kwargs), train_dataset=counting_dataset()
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-4"))
    expected = logged_losses(uninterrupted)
    got = logged_losses(resumed)
    assert sorted(got) == list(range(1, 9))  # the checkpoint's history, then the resumed steps
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


@pytest.mark.transformers_versions
def test_packed_batch_from_data_collator_with_flattening_has_the_padded_batch_loss():
    model = tiny_model().eval()
    documents = [list(range(5, 5 + n)) for n in (7, 12, 3, 9)]
    packed = DataCollatorWithFlattening()([{"input_ids": d} for d in documents])
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    width = max(len(d) for d in documents)
    ids = torch.zeros(len(documents), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, d in enumerate(documents):
        ids[b, : len(d)], mask[b, : len(d)] = torch.tensor(d), 1
    labels = ids.masked_fill(mask == 0, -100)
    padded_loss = model(ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(model(**packed).loss, padded_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.transformers_versions
def test_lora_adapter_trains_saves_and_loads(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = get_peft_model(
        tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    trainer = Trainer(
        model=model, args=training_args(tmp_path / "run", learning_rate=5e-2), train_dataset=counting_dataset()
    )
    trainer.train()
    losses = logged_losses(trainer)
    assert losses[12] < losses[1]
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter").eval()
    ids = torch.tensor(counting_dataset(rows=2)["input_ids"])
    torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits)
