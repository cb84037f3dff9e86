"""The decision layer: a policy plus the estimates it needs, for live routing.

``DecisionLayer`` turns what ``LearnedRouter`` predicts (quality per model, task) into the common
:class:`Estimates` (adding expected cost from the cost model and latency from the latency model),
asks the policy, and returns :class:`RoutingDecision` objects with an ordered fallback chain and a
reason. Spend lives in a ledger (:mod:`router_ml.decision.ledger`) so budgets survive restarts::

    layer = DecisionLayer(build_policy({"name": "utility", "lam": 200}), ModelPool.simulated())
    layer.fit_router(router)             # resolve auto tiers / thresholds on a calibration set
    decision = router.route("Summarise this email ...", policy=layer, latency_slo_s=5)
    ...                                  # call decision.model, then:
    layer.record(decision, cost_usd=0.00042, request_id="req-1")
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from router_ml.decision.base import (
    Estimates,
    PolicyError,
    RoutingDecision,
    Row,
    argmax_cheapest,
    fallback_order,
)
from router_ml.decision.costs import CostModel
from router_ml.decision.latency import LatencyModel
from router_ml.decision.ledger import MemoryLedger, period_start
from router_ml.decision.policies import SLO_PRESETS, Policy
from router_ml.decision.spec import ModelPool

# per-request constraints a caller may pass to route(); each overrides the policy attribute of that name
REQUEST_CONSTRAINTS = (
    "lam",
    "target_quality",
    "max_cost_usd",
    "ttft_slo_s",
    "latency_slo_s",
    "slo",
    "budget_usd",
    "threshold",
)


class DecisionLayer:
    """A policy with a model pool, cost and latency models and a spend ledger.

    ``period``: the budget window of stateful policies ("session", "hour", "day", "week",
    "month"); ``session``: the ledger session key these decisions spend from.
    """

    def __init__(
        self,
        policy: Policy,
        pool: ModelPool,
        cost_model: CostModel | None = None,
        latency_model: LatencyModel | None = None,
        ledger: Any | None = None,
        session: str | None = None,
        period: str = "session",
        max_fallbacks: int = 3,
    ):
        self.policy = policy
        self.pool = pool
        self.cost_model = cost_model or CostModel(pool)
        self.latency_model = latency_model or LatencyModel(pool)
        self.ledger = ledger if ledger is not None else MemoryLedger()
        self.session = session
        self.period = period
        self.max_fallbacks = max_fallbacks
        period_start(period)  # validates the name
        self.models_: list[str] | None = None  # the model columns the policy was fitted on

    # ---- estimates -----------------------------------------------------------------------
    def estimates(
        self,
        prompts: Sequence[str],
        quality: np.ndarray,
        models: Sequence[str],
        tasks: Sequence[str],
        task_proba: np.ndarray | None = None,
        input_tokens: np.ndarray | None = None,
        observed: np.ndarray | None = None,
    ) -> Estimates:
        """Estimates for ``prompts`` over ``models`` (a subset of the pool, in this order)."""
        cols, max_tokens, params_b = self._model_parts(models)
        ce = self.cost_model.estimate(list(prompts), list(tasks), input_tokens=input_tokens)
        ttft, latency = self.latency_model.expected(ce.output_tokens)
        # a hard bound on the bill where the model's max_tokens caps the output; NaN elsewhere
        pin, pout = self.pool.input_price[cols], self.pool.output_price[cols]
        upper = (ce.input_tokens[:, cols] * pin + max_tokens[None, :] * pout) / 1e6
        return Estimates(
            models=list(models),
            quality=np.asarray(quality, dtype="float64"),
            tasks=np.asarray(list(tasks), dtype=object),
            cost=ce.cost_usd[:, cols],
            ttft=ttft[:, cols],
            latency=latency[:, cols],
            is_local=self.pool.is_local[cols],
            params_b=params_b.copy(),
            task_proba=task_proba,
            cost_upper=upper,
            observed=observed,
        )

    def _pool_cache(self, attr: str) -> dict[tuple[str, ...], Any]:
        """The dict kept in ``attr`` for the current pool (a new one when the pool was replaced)."""
        cache = getattr(self, attr, None)
        if cache is None or cache[0] is not self.pool:
            cache = (self.pool, {})
            setattr(self, attr, cache)
        return cache[1]

    def _model_parts(self, models: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pool columns, max_tokens (NaN: none) and params_b (NaN: unknown) of ``models``, each
        ``(m,)``; worked out once per (pool, models)."""
        key = tuple(models)
        cache = self._pool_cache("_parts")
        got = cache.get(key)
        if got is None:
            for name in key:
                if name not in self.pool:
                    raise PolicyError(f"model {name!r} is not in the decision layer's pool {self.pool.names}")
            specs = [self.pool.get(m) for m in key]
            got = cache[key] = (
                np.array([self.pool.index(m) for m in key], dtype=np.int64),
                np.array([s.max_tokens or np.nan for s in specs], dtype="float64"),
                np.array([s.params_b or np.nan for s in specs], dtype="float64"),
            )
        return got

    def fit(self, est: Estimates) -> DecisionLayer:
        """Fit the policy; its tables (capability rules, tiers, strong/weak pair) index ``est.models``,
        so every later decision is made over these columns, candidates or not."""
        self.policy.fit(est)
        self.policy.resume(int(self.ledger.count(since=period_start(self.period), session=self.session)))
        self.models_ = list(est.models)
        return self

    def fit_router(self, router: Any, prompts: Sequence[str] | None = None) -> DecisionLayer:
        """Fit the policy on the router's estimates for ``prompts`` (default: the project's own
        labelled prompts, a mix of every task type)."""
        if prompts is None:
            from router_ml.data.labelled import load_labelled

            prompts = load_labelled("project")["prompt"].tolist()
        q = router.predict_quality(prompts)
        tasks = router.predict_task(prompts)
        return self.fit(self.estimates(prompts, q.to_numpy(), list(q.columns), tasks))

    # ---- decisions -----------------------------------------------------------------------
    def _policy_for(self, constraints: Mapping[str, Any]) -> Policy:
        unknown = set(constraints) - set(REQUEST_CONSTRAINTS)
        if unknown:
            raise PolicyError(f"unknown constraint(s) {sorted(unknown)}; known: {list(REQUEST_CONSTRAINTS)}")
        if not constraints:
            return self.policy
        policy = copy.copy(self.policy)
        for key, value in constraints.items():
            if not hasattr(policy, key):
                raise PolicyError(f"policy {policy.name!r} does not take the constraint {key!r}")
            setattr(policy, key, value)
        if constraints.get("slo") is not None and constraints["slo"] not in SLO_PRESETS:
            raise PolicyError(f"unknown SLO preset {constraints['slo']!r}; known: {sorted(SLO_PRESETS)}")
        return policy

    def spent(self) -> float:
        return float(self.ledger.spent(since=period_start(self.period), session=self.session))

    def decide_batch(
        self,
        prompts: Sequence[str],
        quality: np.ndarray,
        models: Sequence[str],
        task_proba: np.ndarray,
        task_labels: Sequence[str],
        **constraints: Any,
    ) -> list[RoutingDecision]:
        """The router's hook: one decision per prompt (in order, so budgets see earlier ones)."""
        if self.models_ is None:
            raise PolicyError(
                f"policy {self.policy.name!r} is not fitted: call DecisionLayer.fit_router(router) first"
            )
        fitted, models = self.models_, list(models)
        unknown = [m for m in models if m not in fitted]
        if unknown:
            raise PolicyError(
                f"model(s) {unknown} were not among the models the policy was fitted on {fitted}; refit it"
            )
        policy = self._policy_for(constraints)
        tidx = np.argmax(task_proba, axis=1)
        tasks = [task_labels[t] for t in tidx]
        # decide over the fitted columns (the policy's tables index them); non-candidates are infeasible
        cols = [fitted.index(m) for m in models]
        full = np.zeros((len(prompts), len(fitted)))
        full[:, cols] = quality
        est = self.estimates(prompts, full, fitted, tasks, task_proba=task_proba)
        wanted = set(models)
        candidate = np.array([m in wanted for m in fitted], dtype=bool)  # = np.isin(fitted, models)
        if not candidate.all():
            est.feasible = np.repeat(candidate[None, :], len(est), axis=0)
        if policy.stateful:
            # spend so far = the ledger plus the expected bills of this batch's earlier picks
            choice, pending, spent = [], 0.0, self.spent()
            for i in range(len(est)):
                j = policy.step(est.take(slice(i, i + 1)), spent + pending)
                choice.append(j)
                pending += float(est.cost[i, j])
        else:
            choice = list(policy.choose(est))
        usable, allowed = policy.usable(est), est.allowed
        return [
            self._decision(
                policy,
                est if len(est) == 1 else est.take(slice(i, i + 1)),
                int(j),
                usable[i],
                allowed[i],
                float(task_proba[i, tidx[i]]),
                models,
                cols,
            )
            for i, j in enumerate(choice)
        ]

    def prepare_one(self, prompt: str) -> list[float]:
        """What ``decide_one`` needs of the prompt alone (its input tokens per pool model), to
        compute before the encoder runs."""
        return self.cost_model.input_tokens_one(prompt)

    def decide_one(
        self,
        prompt: str,
        quality: np.ndarray,
        models: Sequence[str],
        task_proba: np.ndarray,
        task_labels: Sequence[str],
        prepared: list[float] | None = None,
        **constraints: Any,
    ) -> RoutingDecision:
        """``decide_batch`` for one prompt from ``(m,)`` quality and ``(L,)`` task rows: the same
        decision, built with a third of the numpy calls when the policy is stateless and every
        fitted model is a candidate (otherwise it is ``decide_batch``). ``prepared``:
        :meth:`prepare_one` of the prompt, if already computed."""
        policy = self._policy_for(constraints) if self.models_ is not None else None
        if policy is None or policy.stateful or list(models) != self.models_:
            return self.decide_batch(
                [prompt], quality[None, :], models, task_proba[None, :], task_labels, **constraints
            )[0]
        t = int(np.argmax(task_proba))
        task = task_labels[t]
        if hasattr(policy, "choose_row"):
            return self._decide_row(policy, prompt, quality, models, task, float(task_proba[t]), prepared)
        sel, pin, pout, is_local, params_b, max_tokens = self._one_parts(models)
        ce = self.cost_model.estimate_one(prompt, task, input_tokens=prepared)
        ttft, latency = self.latency_model.expected_one(ce.output_tokens)
        cost, in_tok = ce.cost_usd, ce.input_tokens
        if sel is not None:  # the pool holds more models than these, or in another order
            cost, ttft, latency, in_tok = cost[sel], ttft[sel], latency[sel], in_tok[sel]
        est = Estimates.unchecked(
            models=self.models_,
            quality=np.asarray(quality, dtype="float64")[None, :],
            tasks=np.array([task], dtype=object),
            cost=cost[None, :],
            ttft=ttft[None, :],
            latency=latency[None, :],
            is_local=is_local,
            params_b=params_b,
            task_proba=task_proba[None, :],
            cost_upper=((in_tok * pin + max_tokens * pout) / 1e6)[None, :],
        )
        j = policy.choose_one(est)
        usable = policy.usable(est)[0]
        return self._decision(
            policy,
            est,
            j,
            usable,
            np.ones(len(usable), dtype=bool),
            float(task_proba[t]),
            models,
            range(len(models)),
        )

    def _decide_row(
        self,
        policy: Policy,
        prompt: str,
        quality: np.ndarray,
        models: Sequence[str],
        task: str,
        task_confidence: float,
        prepared: list[float] | None,
    ) -> RoutingDecision:
        """``decide_one`` for a policy with row methods: the estimates of the request as plain
        floats (:class:`~router_ml.decision.base.Row`), the same arithmetic in the same order."""
        sel, is_local, pin, pout = self._row_parts(models)
        in_tok = self.cost_model.input_tokens_one(prompt) if prepared is None else prepared
        out_tok = self.cost_model.output_tokens_one(task)
        cost = [(i * a + o * b) / 1e6 for i, a, o, b in zip(in_tok, pin, out_tok, pout, strict=True)]
        ttft, latency = self.latency_model.expected_row(out_tok)
        if sel is not None:  # the pool holds more models than these, or in another order
            cost, ttft, latency = [cost[k] for k in sel], [ttft[k] for k in sel], [latency[k] for k in sel]
        q = np.asarray(quality, dtype="float64").tolist()
        row = Row(self.models_, task, q, cost, ttft, latency, is_local)
        usable = policy.usable_row(row)
        j = policy.choose_row(row, usable)
        reason = policy.explain_row(row, j, usable)
        chain = fallback_order(q, is_local, j, usable, self.max_fallbacks)
        fitted = self.models_
        max_tokens = getattr(policy, "max_tokens_", {}).get(task) or self.pool.get(fitted[j]).max_tokens
        return RoutingDecision(
            model=fitted[j],
            task=task,
            task_confidence=task_confidence,
            predicted_quality=dict(zip(models, q, strict=True)),
            reason=f"task {task} (p={task_confidence:.2f}); {reason}",
            fallbacks=[fitted[k] for k in chain],
            policy=policy.name,
            expected_cost_usd=cost[j],
            expected_ttft_s=ttft[j],
            expected_latency_s=latency[j],
            max_tokens=None if max_tokens is None else int(max_tokens),
        )

    def _row_parts(self, models: Sequence[str]) -> tuple[Any, ...]:
        """:meth:`_one_parts` as plain Python, kept per (pool, models): (pool columns of ``models``
        as a list, or None when they are the whole pool in order; their is_local flags; the pool's
        input and output prices per million tokens, in pool order)."""
        key = tuple(models)
        cache = self._pool_cache("_rows")
        got = cache.get(key)
        if got is None:
            sel, _, _, is_local, _, _ = self._one_parts(models)
            got = cache[key] = (
                None if sel is None else sel.tolist(),
                is_local.tolist(),
                self.pool.input_price.tolist(),
                self.pool.output_price.tolist(),
            )
        return got

    def _one_parts(self, models: Sequence[str]) -> tuple[Any, ...]:
        """(pool columns of ``models`` or None when they are the whole pool in order, and their
        input and output prices, is_local, params_b and max_tokens rows), kept per (pool, models)
        and read-only: what ``decide_one`` would otherwise cut from the pool on every call."""
        key = tuple(models)
        cache = self._pool_cache("_one")
        got = cache.get(key)
        if got is None:
            cols, max_tokens, params_b = self._model_parts(models)
            rows = [a[cols] for a in (self.pool.input_price, self.pool.output_price, self.pool.is_local)]
            rows += [params_b.copy(), max_tokens.copy()]
            for a in rows:
                a.flags.writeable = False
            whole = len(cols) == len(self.pool) and bool((cols == np.arange(len(cols))).all())
            got = cache[key] = (None if whole else cols, *rows)
        return got

    def _decision(
        self,
        policy: Policy,
        row: Estimates,
        j: int,
        usable: np.ndarray,
        allowed: np.ndarray,
        task_confidence: float,
        models: Sequence[str],
        cols: Sequence[int],
    ) -> RoutingDecision:
        """The decision for the one request of ``row`` when the policy picked column ``j``:
        the fallback chain, the reason and the expected bill; ``usable``/``allowed`` are its rows."""
        fitted, task = self.models_, str(row.tasks[0])
        reason = policy.explain(row, j)
        rule_tokens = getattr(policy, "max_tokens_", {}).get(task)
        if not allowed[j]:  # a rule/tier policy named a model this request excludes
            k = int(argmax_cheapest(np.where(allowed, row.quality[0], -np.inf)[None], row.cost[0][None])[0])
            reason += f"; {fitted[j]} is not allowed here: best predicted allowed model {fitted[k]}"
            j, rule_tokens = k, None
        # the last resort may be a local model outside the policy's constraints, never a non-candidate
        q = row.quality[0].tolist()  # plain floats: the chain and the dict index them one by one
        chain = fallback_order(q, (row.is_local & allowed).tolist(), j, usable.tolist(), self.max_fallbacks)
        max_tokens = rule_tokens or self.pool.get(fitted[j]).max_tokens
        return RoutingDecision(
            model=fitted[j],
            task=task,
            task_confidence=task_confidence,
            predicted_quality={m: q[k] for m, k in zip(models, cols, strict=True)},
            reason=f"task {task} (p={task_confidence:.2f}); {reason}",
            fallbacks=[fitted[k] for k in chain],
            policy=policy.name,
            expected_cost_usd=float(row.cost[0, j]),
            expected_ttft_s=float(row.ttft[0, j]),
            expected_latency_s=float(row.latency[0, j]),
            max_tokens=None if max_tokens is None else int(max_tokens),
        )

    def record(
        self,
        decision: RoutingDecision | str,
        cost_usd: float,
        request_id: str | None = None,
        ttft_s: float | None = None,
        tokens_per_s: float | None = None,
    ) -> bool:
        """Book a finished call: spend into the ledger (idempotent per ``request_id``), the bill
        into the pacing policy, measured latency into the latency model."""
        model = decision.model if isinstance(decision, RoutingDecision) else decision
        if model not in self.pool:
            raise PolicyError(f"cannot record spend for unknown model {model!r}")
        new = self.ledger.record(cost_usd, model, request_id=request_id, session=self.session)
        if new:
            expected = decision.expected_cost_usd if isinstance(decision, RoutingDecision) else None
            self.policy.observe_cost(float(expected if expected is not None else cost_usd), float(cost_usd))
        if ttft_s is not None or tokens_per_s is not None:
            self.latency_model.observe(model, ttft_s=ttft_s, tokens_per_s=tokens_per_s)
        return bool(new)
