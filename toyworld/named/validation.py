"""Validation concepts of the toy world and a pretraining callback that logs their identity every N steps.

Validation concepts are objects of the base distribution (seen shape-colour-pattern combinations), never the test
concepts (held-out shapes and combinations): every setting (learning rates, steps, regulariser weight) is chosen
on them. The callback predicts (v*, cores) from each concept's one input image with the encoder being trained (no
tuning: the encoder-only result, which is where tuning starts), samples it in new contexts and lets the attribute
checker read the samples, so the pretraining curve shows when the encoder saturates.

    trainer.callbacks: [{class_path: toyworld.named.validation.ValidationIdentity, init_args: {every_n_steps: 500}}]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from lightning import Callback

from toyworld.common.pipeline import ASSETS
from toyworld.named.world import (
    HELD_OUT_CONCEPTS,
    HELD_OUT_SHAPES,
    TRAIN_SHAPES,
    VALUES,
    caption,
    concept_scene,
    is_held_out,
    random_scene,
    render,
    seeded_rng,
    to_tensor,
)

IDENTITY = ("shape", "colour", "pattern")
CONTEXT = ("background", "position", "size")


def _draw_objects(
    shapes: tuple[str, ...], n: int, rng: np.random.Generator, excluded
) -> list[tuple[str, str, str]]:
    """``n`` distinct (shape, colour, pattern) objects, shapes cycling through ``shapes``, colour and pattern drawn
    from ``rng``; an object for which ``excluded(obj)`` is true is drawn again."""
    out: list[tuple[str, str, str]] = []
    while len(out) < n:
        shape = shapes[len(out) % len(shapes)]
        obj = (shape, str(rng.choice(VALUES["colour"])), str(rng.choice(VALUES["pattern"])))
        if obj in out or excluded(obj):
            continue
        out.append(obj)
    return out


def validation_concepts(n: int = 8, seed: int = 1234) -> list[tuple[str, str, str]]:
    """``n`` distinct (shape, colour, pattern) objects of the base distribution, disjoint from the test concepts.
    Shapes cycle through the training shapes so every one is represented."""
    return _draw_objects(
        TRAIN_SHAPES,
        n,
        seeded_rng(seed, 0x76616C),
        lambda obj: obj in HELD_OUT_CONCEPTS or is_held_out(concept_scene(*obj)),
    )


def novel_validation_concepts(n: int = 4, seed: int = 1234) -> list[tuple[str, str, str]]:
    """``n`` distinct novel-shape objects for validation: the held-out shapes (which the base model never saw, so no
    word names them) in looks no test concept has (``HELD_OUT_CONCEPTS``). The world has only two shapes the base
    never saw and the test's 4 novel concepts use both, so these share the test's shapes in other colours and
    patterns, as the instance world's validation instances share the test's categories."""
    return _draw_objects(HELD_OUT_SHAPES, n, seeded_rng(seed, 0x6E6F76), lambda obj: obj in HELD_OUT_CONCEPTS)


def context_prompts(obj: tuple[str, str, str], n: int, seed: int, placeholder: str = "<s*>") -> list[dict]:
    """``n`` new contexts for an object: prompts with the placeholder for the object, and the wanted attributes."""
    rng = seeded_rng(seed, 0x637478)
    rows = []
    for _ in range(n):
        scene = random_scene(rng, "all", shape=obj[0], colour=obj[1], pattern=obj[2])
        rows.append({"prompt": caption(scene, identity=placeholder), "attributes": scene.__dict__})
    return rows


class ValidationIdentity(Callback):
    """Every ``every_n_steps`` steps (and at the end): encoder-only identity and prompt accuracy on the validation
    concepts at each of ``alphas``, read by the attribute checker; logged as ``val/identity_a<alpha>`` and
    ``val/prompt_a<alpha>`` and appended to ``<log_dir>/validation.jsonl``.

    Args:
        every_n_steps: interval in optimizer steps.
        n_concepts: number of validation concepts (:func:`validation_concepts`).
        prompts_per_concept: new contexts sampled per concept.
        alphas: dual-path blends to sample at.
        inference_steps: DDIM steps of the samples.
        guidance_scale: classifier-free guidance.
        checker_dir: the committed attribute checker.
        seed: seed of the concepts' contexts and the sampling noise.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        n_concepts: int = 8,
        prompts_per_concept: int = 3,
        alphas: tuple[float, ...] = (0.5, 1.0),
        inference_steps: int = 10,
        guidance_scale: float = 3.0,
        checker_dir: str = str(ASSETS / "checker"),
        seed: int = 0,
    ) -> None:
        self.every_n_steps, self.n_concepts, self.k = every_n_steps, n_concepts, prompts_per_concept
        self.alphas, self.inference_steps, self.guidance = tuple(alphas), inference_steps, guidance_scale
        self.checker_dir, self.seed = checker_dir, seed
        self._checker = None
        self._last_step: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step % max(self.every_n_steps, 1) != 0:
            self.run(trainer, pl_module)

    def inputs(self, resolution: int, placeholder: str) -> tuple[torch.Tensor, list[list[str]], list]:
        """The validation concepts: their input images ((N, 3, R, R) in [-1, 1]), ``self.k`` prompts per concept
        and what each prompt wants (passed on to :meth:`score`)."""
        objects = validation_concepts(self.n_concepts)
        images = to_tensor(np.stack([render(concept_scene(*o), resolution) for o in objects]))
        rows = [context_prompts(o, self.k, self.seed + i, placeholder) for i, o in enumerate(objects)]
        return (
            images,
            [[r["prompt"] for r in rs] for rs in rows],
            [r["attributes"] for rs in rows for r in rs],
        )

    def score(self, samples: torch.Tensor, images: torch.Tensor, wanted: list) -> dict[str, float]:
        """``identity`` and ``prompt`` of the samples ((N * k, 3, R, R) in [0, 1], concept-major) as the attribute
        checker reads them."""
        from toyworld.named.checker import AttributeChecker

        if self._checker is None:
            self._checker = AttributeChecker.from_pretrained(self.checker_dir).eval()
        read = self._checker.predict(samples.float().cpu() * 2 - 1)
        n = len(wanted)
        ident = sum(all(read[a][i] == wanted[i][a] for a in IDENTITY) for i in range(n)) / n
        ctx = sum(all(read[a][i] == wanted[i][a] for a in CONTEXT) for i in range(n)) / n
        return {"identity": ident, "prompt": ctx}

    @torch.no_grad()
    def measure(self, pl_module, zero_cores: bool = False) -> dict[str, float]:
        """Each :meth:`score` column per alpha (``identity_a1``, ...) of the module's encoder-only predictions
        (``zero_cores``: with the predicted v* but no weight offsets, the reference the predicted cores must beat)."""
        from models.sampling import sample_personalized

        bb = pl_module.backbone
        images, prompts, wanted = self.inputs(bb.resolution, bb.placeholder)
        clip = torch.nn.functional.interpolate((images + 1) / 2, size=bb.clip_image_size, mode="bilinear")
        proc = bb.image_processor
        mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
        clip = ((clip - mean) / std).to(pl_module.device)
        latents = bb.encode_images(images.to(pl_module.device)).float()
        noised = pl_module.probe_noised(latents)
        pred = pl_module.personalizer.predict(
            bb, clip, noised.noisy, noised.timesteps, pl_module.empty_context()
        )
        cores = torch.zeros_like(pred.cores) if zero_cores else pred.cores
        index = torch.tensor([i for i, ps in enumerate(prompts) for _ in ps], device=pl_module.device)
        hard = pl_module.token_index.search(pred.v_star, 1).ids[:, 0].to(pl_module.device)
        out = {}
        was_training = pl_module.training
        pl_module.eval()
        try:
            for alpha in self.alphas:
                samples = sample_personalized(
                    bb,
                    [p for ps in prompts for p in ps],
                    pred.v_star[index],
                    pl_module.lora_deltas(cores[index]),
                    hard[index],
                    alpha=alpha,
                    num_inference_steps=self.inference_steps,
                    guidance_scale=self.guidance,
                    generator=torch.Generator().manual_seed(self.seed),
                )
                for key, value in self.score(samples, images, wanted).items():
                    out[f"{key}_a{alpha:g}"] = value
        finally:
            pl_module.train(was_training)
        return out

    def run(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0 or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        values = self.measure(pl_module)
        step = trainer.global_step
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"val/{k}": v for k, v in values.items()}, step=step)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "validation.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **{k: round(v, 4) for k, v in values.items()}}) + "\n")


def write_validation_concepts(out: str, n: int = 8, seed: int = 1234, novel: int = 0) -> str:
    """Writes the validation concepts like the test concepts (``<name>.png`` + ``concepts.json``), so the
    evaluation harness runs on them with ``concepts.toyworld.concepts_dir: <out>``: the ``n`` base-distribution
    objects (kind ``validation``), then ``novel`` novel-shape objects (kind ``validation_novel_shape``,
    :func:`novel_validation_concepts`), whose vanilla-path word is "object" as the test's novel shapes' is."""
    from dataclasses import asdict

    from PIL import Image

    from toyworld.named.world import concept_name, concept_template, identity_phrase

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    objects = [(o, "validation") for o in validation_concepts(n, seed)]
    objects += [(o, "validation_novel_shape") for o in novel_validation_concepts(novel, seed)]
    for (shape, colour, pattern), kind in objects:
        name = concept_name(shape, colour, pattern)
        scene = concept_scene(shape, colour, pattern)
        Image.fromarray(render(scene)).save(folder / f"{name}.png")
        rows.append(
            {
                "name": name,
                "image": f"{name}.png",
                "kind": kind,
                "class_noun": "object" if kind == "validation_novel_shape" else shape,
                "words": identity_phrase(colour, pattern, shape),
                "template": concept_template(shape, colour, pattern),
                "attributes": asdict(scene),
            }
        )
    (folder / "concepts.json").write_text(json.dumps(rows, indent=1) + "\n")
    return str(folder)


def load_pretrained(ckpt: str, config: str | list[str]):
    """The LightningCLI of the pretraining ``config`` (not run; a list: a config and the overlays stacked on it) with
    ``ckpt``'s weights loaded into its model and the model set up (token index built); the checkpoint is checked
    against the config's base model first."""
    from lightning_modules.checkpoint import check_checkpoint, read_checkpoint
    from lightning_modules.cli import build_cli

    configs = [config] if isinstance(config, str) else list(config)
    config = " + ".join(configs)
    cli = build_cli([*(a for c in configs for a in ("--config", c)), "--trainer.logger", "false"], run=False)
    checkpoint = read_checkpoint(ckpt, "encoder checkpoint")
    check_checkpoint(checkpoint, cli.model.backbone, phase="pretrain", source=ckpt)
    try:
        cli.model.load_state_dict(checkpoint["state_dict"], strict=False)
    except RuntimeError as err:  # weights of another shape: the checkpoint was trained with another config
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise ValueError(f"{ckpt} was not trained with {config} ({first})") from None
    cli.model.setup("validate")
    return cli


def measure_checkpoint(
    ckpt: str, config: str = "configs/pretrain/toyworld.yaml", **kwargs
) -> dict[str, float]:
    """Encoder-only validation identity / prompt accuracy of a pretraining checkpoint at each alpha, with its
    predicted cores and with zero cores (keys ``..._zero_cores``), measured by the ``ValidationIdentity`` class
    ``config`` trains with (``InstanceValidationIdentity`` for ``configs/pretrain/instance.yaml``)."""
    cli = load_pretrained(ckpt, config)
    module = cli.model
    # the config's own validation callback class (the instance world's scores pixels), with ``kwargs``
    found = [c for c in cli.trainer.callbacks if isinstance(c, ValidationIdentity)]
    callback = (type(found[0]) if found else ValidationIdentity)(**kwargs)
    out = callback.measure(module)
    out.update({f"{k}_zero_cores": v for k, v in callback.measure(module, zero_cores=True).items()})
    return out
