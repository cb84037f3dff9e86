"""``LearnedRouter`` = encoder + task head + quality head (+ calibrator) + model pool.

Predictor (estimates) and policy (decides) stay apart: this class estimates and, with no
constraints, routes to the highest predicted quality. The cost/latency decision layer plugs in
through ``route(..., policy=...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from router_ml.checkpoint import SCHEMA_VERSION, CheckpointError, read_arrays, read_config, write_checkpoint
from router_ml.decision.base import RoutingDecision, Uncertainty
from router_ml.decision.fit_set import PolicyFitSet
from router_ml.embeddings.base import Encoder, layer_columns
from router_ml.predictors.base import Calibrator, QualityHead, TaskHead

if TYPE_CHECKING:
    from router_ml.decision.layer import DecisionLayer


class RoutingError(ValueError):
    """A routing request that cannot be served as asked (empty prompt, unknown model, ...)."""


def _check_prompts(prompts: str | Sequence[str]) -> list[str]:
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise RoutingError("no prompts given")
    for i, p in enumerate(items):
        if not isinstance(p, str):
            raise RoutingError(f"prompt {i} is {type(p).__name__}, expected str")
        if not p.strip():
            raise RoutingError(f"prompt {i} is empty")
    return items


class LearnedRouter:
    """Routes a prompt to one of ``models`` by predicted quality.

    Parameters: ``encoder`` (an :class:`router_ml.embeddings.Encoder`), ``task_head``
    (a fitted ``TaskClassifier``), ``quality_head`` (a fitted quality predictor with
    ``predict(X) -> (n, n_models)``), ``models`` (column order of the quality head),
    ``calibrator`` (optional, fitted), ``guard`` (optional, a fitted
    :class:`~router_ml.predictors.guard.NoveltyGuard`: novelty, a margin before leaving the pool prior's model (or shrinkage toward the prior) and
    quality intervals), ``metadata`` (what ``router.json`` records),
    ``policy_fit`` (optional: the :class:`~router_ml.decision.fit_set.PolicyFitSet` a decision layer
    fits its policies on; a checkpoint carries it so that a proxy needs no data of the project's).
    """

    def __init__(
        self,
        encoder: Encoder,
        task_head: TaskHead,
        quality_head: QualityHead,
        models: Sequence[str],
        calibrator: Calibrator | None = None,
        metadata: dict[str, Any] | None = None,
        policy_fit: PolicyFitSet | None = None,
        guard: Any | None = None,
    ) -> None:
        self.encoder = encoder
        self.task_head = task_head
        self.quality_head = quality_head
        self.models = list(models)
        self.calibrator = calibrator
        self.guard = guard
        self.metadata = dict(metadata or {})
        self.policy_fit = policy_fit
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"duplicate model names in {self.models}")
        if policy_fit is not None and list(policy_fit.models) != self.models:
            raise ValueError(
                f"policy fit set is over models {policy_fit.models}, the router's are {self.models}"
            )

    @property
    def task_labels(self) -> list[str]:
        return list(self.task_head.labels)

    # ---- estimates -------------------------------------------------------------------------
    def embed(self, prompts: str | Sequence[str]) -> np.ndarray:
        """(n, dim) float32 embeddings of the prompts."""
        return self.encoder.encode(_check_prompts(prompts), show_progress=False)

    @property
    def task_layers(self) -> tuple[int, ...]:
        """Encoder layers whose pooled states the task head reads beside the embedding (may be none)."""
        return tuple(self.task_head.layers)

    @property
    def quality_layers(self) -> tuple[int, ...]:
        """Encoder layers whose pooled states the quality head reads beside the embedding (may be none)."""
        return tuple(getattr(self.quality_head, "layers", ()))

    @property
    def guard_layers(self) -> tuple[int, ...]:
        """Encoder layers whose pooled states the novelty guard's distances read (may be none)."""
        return tuple(getattr(self.guard, "layers", ()) or ())

    def _encode(self, items: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(the guard's features (the embeddings, then its layers' states), the task head's
        features, the quality head's features): one forward pass over the union of their layers."""
        have = tuple(sorted(set(self.task_layers) | set(self.quality_layers) | set(self.guard_layers)))
        if not have:
            X = self.encoder.encode(items, show_progress=False)
            return X, X, X
        wide = self.encoder.encode_layers(items, have, show_progress=False)
        dim = int(self.encoder.dim)

        def view(layers: tuple[int, ...]) -> np.ndarray:
            return wide if layers == have else np.ascontiguousarray(wide[:, layer_columns(have, layers, dim)])

        return view(self.guard_layers), view(self.task_layers), view(self.quality_layers)

    def quality_features(self, prompts: str | Sequence[str]) -> np.ndarray:
        """What the quality head reads of the prompts: the embeddings, then the pooled states of
        its :attr:`quality_layers` (``(n, dim * (1 + len(layers)))``)."""
        items = _check_prompts(prompts)
        return self._encode(items)[2]

    def _quality_from_embeddings(
        self, X: np.ndarray, texts: Sequence[str] | None = None, text_part: Any = None
    ) -> np.ndarray:
        """(n, m) quality from embeddings ``X (n, d)``; a quality head that reads the text
        (``uses_text``) gets the n prompt ``texts`` or their ``text_part``."""
        head = self.quality_head
        q = head.predict(X, texts=texts, text_part=text_part) if head.uses_text else head.predict(X)
        if self.calibrator is not None:
            q = self.calibrator.transform(q)
        return np.clip(q, 0.0, 1.0)

    def predict_task_proba(self, prompts: str | Sequence[str]) -> pd.DataFrame:
        """A row per prompt, a column per task label; rows sum to 1."""
        items = _check_prompts(prompts)
        return pd.DataFrame(
            self.task_head.predict_proba(self._encode(items)[1], texts=items), columns=self.task_labels
        )

    def predict_task(self, prompts: str | Sequence[str]) -> list[str]:
        items = _check_prompts(prompts)
        return list(self.task_head.predict(self._encode(items)[1], texts=items))

    def predict_quality(self, prompts: str | Sequence[str]) -> pd.DataFrame:
        """A row per prompt, a column per model, values in [0, 1] (calibrated when a calibrator is
        set, guarded by novelty when a guard is: every model but the pool prior's lowered by the
        novelty margin)."""
        items = _check_prompts(prompts)
        X, _, X_quality = self._encode(items)
        q = self._quality_from_embeddings(X_quality, texts=items)
        if self.guard is not None:
            q = self.guard.transform(X, q, texts=items).quality
        return pd.DataFrame(q, columns=self.models)

    def predict_novelty(self, prompts: str | Sequence[str]) -> np.ndarray:
        """(n,) novelty in [0, 1] of the prompts (needs a guard): how likely each comes from a task
        family the router never trained on."""
        if self.guard is None:
            raise RoutingError("this router has no novelty guard (train it with guard.enabled=true)")
        items = _check_prompts(prompts)
        return self.guard.novelty(self._encode(items)[0], texts=items)

    def _guarded(
        self, X: np.ndarray, quality: np.ndarray, cand: list[int], texts: Sequence[str]
    ) -> tuple[np.ndarray, Uncertainty | None]:
        """The guard's shrunk quality (n, m) and its :class:`Uncertainty` over the ``cand`` columns
        (``texts``: the n prompts, for a guard whose novelty reads them)."""
        if self.guard is None:
            return quality, None
        g = self.guard.transform(X, quality, texts=texts)
        u = Uncertainty(
            novelty=g.novelty,
            shrink=g.shrink,
            lower=g.lower[:, cand],
            upper=g.upper[:, cand],
            prior_model=self.models[self.guard.prior_model],
        )
        return g.quality, u

    def predict_quality_and_task(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """(quality (n, m) as :meth:`predict_quality`, tasks as :meth:`predict_task`) from one encoder pass."""
        items = _check_prompts(prompts)
        _, X_task, X_quality = self._encode(items)
        tasks = list(self.task_head.predict(X_task, texts=items))
        return self._quality_from_embeddings(X_quality, texts=items), tasks

    # ---- decisions -------------------------------------------------------------------------
    def _candidates(
        self, allowed_models: Sequence[str] | None, exclude_models: Sequence[str] | None
    ) -> list[int]:
        names = list(allowed_models) if allowed_models is not None else list(self.models)
        for name in [*names, *(exclude_models or [])]:
            if name not in self.models:
                raise RoutingError(f"unknown model {name!r}; this router knows {self.models}")
        idx = [self.models.index(n) for n in names if n not in set(exclude_models or [])]
        if not idx:
            raise RoutingError("no candidate model left after allowed_models/exclude_models")
        return idx

    def route(
        self,
        prompt: str,
        *,
        allowed_models: Sequence[str] | None = None,
        exclude_models: Sequence[str] | None = None,
        policy: DecisionLayer | None = None,
        **constraints: Any,
    ) -> RoutingDecision:
        """Pick a model for one prompt.

        With no policy, the candidate with the highest predicted quality wins; the others follow
        in ``fallbacks`` by predicted quality. ``policy`` (a :class:`router_ml.decision.DecisionLayer`)
        adds expected cost and latency, applies ``constraints`` (``max_cost_usd``,
        ``latency_slo_s``, ``slo``, ``lam``, ...) and returns the decision.
        """
        return self.route_batch(
            [prompt],
            allowed_models=allowed_models,
            exclude_models=exclude_models,
            policy=policy,
            **constraints,
        )[0]

    def route_batch(
        self,
        prompts: Sequence[str],
        *,
        allowed_models: Sequence[str] | None = None,
        exclude_models: Sequence[str] | None = None,
        policy: DecisionLayer | None = None,
        **constraints: Any,
    ) -> list[RoutingDecision]:
        """One decision per prompt (see :meth:`route`): one path for one prompt and for many."""
        items = _check_prompts(prompts)
        cand = self._candidates(allowed_models, exclude_models)
        if policy is None and constraints:
            raise RoutingError(
                f"constraint(s) {sorted(constraints)} need a policy (the decision layer); none was given"
            )
        # what reads only the text runs first, while the CPU caches still hold what it reads: the
        # encoder's weights flush them
        task_text = self.task_head.text_part(items)
        quality_text = self.quality_head.text_part(items)
        tokens = policy.count_input_tokens(items) if policy is not None else None
        X, X_task, X_quality = self._encode(items)
        task_p = self.task_head.predict_proba(X_task, texts=items, text_part=task_text)
        quality = self._quality_from_embeddings(X_quality, texts=items, text_part=quality_text)
        quality, unc = self._guarded(X, quality, cand, items)
        if policy is None:
            return self._decisions(task_p, quality, cand, unc)
        names = [self.models[j] for j in cand]
        return policy.decide(
            items,
            quality[:, cand],
            names,
            task_p,
            self.task_labels,
            input_tokens=tokens,
            uncertainty=unc,
            **constraints,
        )

    def _decisions(
        self, task_p: np.ndarray, quality: np.ndarray, cand: list[int], unc: Uncertainty | None = None
    ) -> list[RoutingDecision]:
        """Highest-predicted-quality decisions from ``task_p`` (n, n_tasks) and ``quality``
        (n, n_models) over the ``cand`` columns; ties go to the earlier model in ``self.models``;
        ``unc``: the guard's novelty and intervals, carried into each decision."""
        from router_ml.decision.layer import with_uncertainty

        labels, names = self.task_labels, [self.models[j] for j in cand]
        by_rank = sorted(range(len(cand)), key=lambda k: cand[k])  # candidates in the router's order
        q = np.ascontiguousarray(quality[:, cand], dtype=np.float64)  # (n, c)
        ranks = np.asarray(by_rank)[np.argsort(-q[:, by_rank], axis=1, kind="stable")]  # (n, c)
        t = task_p.argmax(axis=1)
        t_conf = task_p[np.arange(len(t)), t].tolist()
        out = []
        for qi, order, ti, conf in zip(q.tolist(), ranks.tolist(), t.tolist(), t_conf, strict=True):
            ranked = [names[k] for k in order]
            best = ranked[0]
            runner = f"; next {ranked[1]} at {qi[order[1]]:.2f}" if len(ranked) > 1 else ""
            out.append(
                RoutingDecision(
                    model=best,
                    task=labels[ti],
                    task_confidence=conf,
                    predicted_quality=dict(zip(names, qi, strict=True)),
                    reason=f"task {labels[ti]} (p={conf:.2f}); highest predicted quality: {best} at "
                    f"{qi[order[0]]:.2f}{runner}",
                    fallbacks=ranked[1:],
                )
            )
        if unc is not None:
            for i, d in enumerate(out):
                with_uncertainty(d, unc, i, names)
        return out

    # ---- persistence -----------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, metrics: dict[str, float] | None = None) -> Path:
        """Write the checkpoint directory (router.json, weights.safetensors, README.md)."""
        from router_ml.card import model_card

        config = dict(self.metadata)
        config.update(
            {
                "encoder": {**self.encoder.get_config(), "id": self.encoder.id, "dim": int(self.encoder.dim)},
                "models": self.models,
                "task_labels": self.task_labels,
                "task_head": {"type": type(self.task_head).name, "params": self.task_head.get_params()},
                "quality_head": {
                    "type": type(self.quality_head).name,
                    "params": self.quality_head.get_params(),
                },
                "calibrator": None
                if self.calibrator is None
                else {"type": type(self.calibrator).name, "params": self.calibrator.get_params()},
                "guard": None
                if self.guard is None
                else {"type": type(self.guard).name, "params": self.guard.get_params()},
            }
        )
        if metrics is not None:
            config["metrics"] = metrics
        arrays = {"task": self.task_head.state_dict(), "quality": self.quality_head.state_dict()}
        if self.calibrator is not None:
            arrays["calibrator"] = self.calibrator.state_dict()
        config.pop("policy_fit", None)
        if self.policy_fit is not None:
            config["policy_fit"] = self.policy_fit.to_config()
            arrays["policy_fit"] = {"quality": np.asarray(self.policy_fit.quality, dtype="float64")}
        if self.guard is not None:
            arrays["guard"] = self.guard.state_dict()
        self.metadata = {k: v for k, v in config.items() if k not in ("package_versions", "policy_fit")}
        return write_checkpoint(
            path, config, arrays, model_card({**config, "schema_version": SCHEMA_VERSION})
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, encoder: Any | None = None) -> LearnedRouter:
        """Load a checkpoint directory. ``encoder`` overrides the recorded one (it must match its dim)."""
        from router_ml.embeddings import build_encoder
        from router_ml.predictors import CALIBRATORS, QUALITY_HEADS, TaskClassifier
        from router_ml.predictors.guard import NoveltyGuard

        config = read_config(path)
        arrays = read_arrays(path, config)
        enc_cfg = {k: v for k, v in config["encoder"].items() if k not in ("id", "dim")}
        enc = encoder if encoder is not None else build_encoder(enc_cfg)
        if encoder is None and enc.id != config["encoder"]["id"]:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was trained with encoder {config['encoder']['id']!r}, "
                f"but its config builds {enc.id!r}"
            )
        if int(enc.dim) != int(config["encoder"]["dim"]):
            raise CheckpointError(
                f"checkpoint {str(path)!r} expects {config['encoder']['dim']}-dim embeddings; "
                f"encoder {enc.id!r} gives {enc.dim}"
            )

        def build(kind: str, registry: dict[str, Any], state: dict[str, np.ndarray]) -> Any:
            spec = config[kind]
            if spec["type"] not in registry:
                raise CheckpointError(f"checkpoint {str(path)!r}: unknown {kind} type {spec['type']!r}")
            try:
                return registry[spec["type"]](**spec.get("params", {})).load_state_dict(state)
            except (ValueError, TypeError, KeyError) as e:
                raise CheckpointError(f"checkpoint {str(path)!r}: cannot restore {kind}: {e}") from e

        task_head = build("task_head", {TaskClassifier.name: TaskClassifier}, arrays["task"])
        quality_head = build("quality_head", QUALITY_HEADS, arrays["quality"])
        calibrator = (
            build("calibrator", CALIBRATORS, arrays["calibrator"]) if config.get("calibrator") else None
        )
        # a checkpoint written before the guard existed has no "guard" key: it loads without one
        guard = (
            build("guard", {NoveltyGuard.name: NoveltyGuard}, arrays["guard"])
            if config.get("guard")
            else None
        )
        if guard is not None and len(guard.prior_) != len(config["models"]):
            raise CheckpointError(
                f"checkpoint {str(path)!r}: the guard covers {len(guard.prior_)} models, "
                f"router.json lists {len(config['models'])}"
            )
        if list(task_head.labels) != list(config["task_labels"]):
            raise CheckpointError(
                f"checkpoint {str(path)!r}: task labels differ between router.json and task head"
            )
        if getattr(quality_head, "n_models_", len(config["models"])) != len(config["models"]):
            raise CheckpointError(
                f"checkpoint {str(path)!r}: quality head predicts {quality_head.n_models_} models, "
                f"router.json lists {len(config['models'])}"
            )
        parts = (("task", task_head), ("quality", quality_head), ("guard", guard))
        for what, head in (p for p in parts if p[1] is not None):
            layers = tuple(getattr(head, "layers", ()))
            if layers and not hasattr(enc, "encode_layers"):
                raise CheckpointError(
                    f"checkpoint {str(path)!r}: the {what} head reads encoder layers {list(layers)}, "
                    f"which encoder {enc.id!r} cannot give"
                )
            dim = head.bank_.shape[1] if what == "guard" else getattr(head, "dim_", None)
            if dim is not None and dim != int(enc.dim) * (1 + len(layers)):
                raise CheckpointError(
                    f"checkpoint {str(path)!r}: the {what} head takes {dim} features; encoder "
                    f"{enc.id!r} with layers {list(layers)} gives {int(enc.dim) * (1 + len(layers))}"
                )
        policy_fit = None
        if config.get("policy_fit") is not None:
            try:
                policy_fit = PolicyFitSet.from_config(
                    config["policy_fit"], arrays["policy_fit"]["quality"], config["models"]
                )
            except (ValueError, TypeError, KeyError) as e:
                raise CheckpointError(
                    f"checkpoint {str(path)!r}: cannot restore the policy fit set: {e!r}"
                ) from e
            unknown = sorted(set(policy_fit.tasks) - set(task_head.labels))
            if unknown:
                raise CheckpointError(
                    f"checkpoint {str(path)!r}: the policy fit set has task(s) {unknown} outside the task labels"
                )
        meta = {k: v for k, v in config.items() if k not in ("package_versions", "policy_fit")}
        return cls(
            enc,
            task_head,
            quality_head,
            config["models"],
            calibrator=calibrator,
            metadata=meta,
            policy_fit=policy_fit,
            guard=guard,
        )
