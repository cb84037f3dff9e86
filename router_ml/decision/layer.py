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
    Uncertainty,
    argmax_cheapest,
    fallback_order,
)
from router_ml.decision.costs import CostModel
from router_ml.decision.latency import LatencyModel
from router_ml.decision.ledger import MemoryLedger, period_start
from router_ml.decision.policies import SLO_PRESETS, Policy
from router_ml.decision.spec import ModelPool

# Per-request limits: the operator's configuration is a ceiling, so a request may only TIGHTEN
# them: effective = min(operator, request) (None on either side: no limit there). An ``slo`` preset
# is read as its limits, tightened the same way.
CEILINGS = ("budget_usd", "hard_cap_usd", "max_cost_usd", "ttft_slo_s", "latency_slo_s")
# Per-request preferences that trade quality for cost inside those limits: free to set.
PREFERENCES = ("lam", "target_quality", "threshold")
# every constraint a caller may pass to route(); each sets the policy attribute of that name
REQUEST_CONSTRAINTS = (*PREFERENCES, *CEILINGS, "slo")


def _tighter(operator: float | None, request: Any, key: str) -> float | None:
    """min(operator, request) for a limit; a request value that is no limit is refused."""
    if request is None:
        return operator
    if isinstance(request, bool) or not isinstance(request, (int, float)) or not request >= 0:
        raise PolicyError(f"constraint {key!r} must be a number >= 0, got {request!r}")
    return float(request) if operator is None else min(float(operator), float(request))


def _operator_limit(policy: Policy, key: str) -> float | None:
    """The limit ``key`` as ``policy`` applies it now (an SLO preset's value where no explicit one)."""
    if key == "hard_cap_usd" and hasattr(policy, "cap"):
        return policy.cap
    if key in ("ttft_slo_s", "latency_slo_s") and hasattr(policy, "limits"):
        return policy.limits()[0 if key == "ttft_slo_s" else 1]
    return getattr(policy, key)


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
        cols, usd_in, usd_max_out, params_b = self._model_parts(models)
        ce = self.cost_model.estimate(prompts, tasks, input_tokens=input_tokens)
        ttft, latency = self.latency_model.expected(ce.output_tokens)
        # a hard bound on the bill where the model's max_tokens caps the output; NaN elsewhere
        upper = ce.input_tokens[:, cols] * usd_in + usd_max_out
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

    def _model_parts(
        self, models: Sequence[str]
    ) -> tuple[np.ndarray | slice, np.ndarray, np.ndarray, np.ndarray]:
        """Pool columns (an index array, or a slice for the whole pool in order), USD per input
        token, USD of ``max_tokens`` output tokens (NaN: no max_tokens) and params_b (NaN: unknown)
        of ``models``, each ``(m,)``; worked out once per (pool, models) and kept (a new pool starts
        a new cache)."""
        key = tuple(models)
        cache = getattr(self, "_parts", None)
        if cache is None or cache[0] is not self.pool:
            cache = self._parts = (self.pool, {})
        got = cache[1].get(key)
        if got is None:
            for name in key:
                if name not in self.pool:
                    raise PolicyError(f"model {name!r} is not in the decision layer's pool {self.pool.names}")
            specs = [self.pool.get(m) for m in key]
            cols = [self.pool.index(m) for m in key]
            max_tokens = np.array([s.max_tokens or np.nan for s in specs], dtype="float64")
            got = cache[1][key] = (
                # the whole pool in its order: a slice, whose cuts are views, not copies
                slice(None) if cols == list(range(len(self.pool))) else np.array(cols, dtype=np.int64),
                self.pool.input_price[cols] / 1e6,
                max_tokens * self.pool.output_price[cols] / 1e6,
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
        """Fit the policy on the router's estimates for ``prompts`` (default: the router's policy fit
        set, which its checkpoint carries; without one, the project's own labelled prompts)."""
        if prompts is None and getattr(router, "policy_fit", None) is not None:
            return self.fit(router.policy_fit.estimates(self, router.models))
        if prompts is None:
            from router_ml.data.labelled import load_labelled

            prompts = load_labelled("project")["prompt"].tolist()
        q = router.predict_quality(prompts)
        tasks = router.predict_task(prompts)
        return self.fit(self.estimates(prompts, q.to_numpy(), list(q.columns), tasks))

    # ---- decisions -----------------------------------------------------------------------
    def _policy_for(self, constraints: Mapping[str, Any]) -> Policy:
        """The policy with a request's constraints applied: the one place the ceiling rule holds.

        Limits (:data:`CEILINGS`, ``slo``) only tighten the operator's: effective = min(operator,
        request), so ``router:cost_aware:1e6`` cannot lift a $1 budget, nor ``slo=research`` an
        operator's ``realtime``. Preferences (:data:`PREFERENCES`) are set as given."""
        if not constraints:
            return self.policy
        unknown = set(constraints) - set(REQUEST_CONSTRAINTS)
        if unknown:
            raise PolicyError(f"unknown constraint(s) {sorted(unknown)}; known: {list(REQUEST_CONSTRAINTS)}")
        for key in constraints:
            if not hasattr(self.policy, key):
                raise PolicyError(f"policy {self.policy.name!r} does not take the constraint {key!r}")
        policy = copy.copy(self.policy)
        slo = constraints.get("slo")
        if slo is not None:
            if slo not in SLO_PRESETS:
                raise PolicyError(f"unknown SLO preset {slo!r}; known: {sorted(SLO_PRESETS)}")
            t, c, size = SLO_PRESETS[slo]
            op = self.policy.limits()
            policy.slo = slo
            policy.ttft_slo_s, policy.latency_slo_s = _tighter(op[0], t, "slo"), _tighter(op[1], c, "slo")
            if hasattr(policy, "max_params_b"):
                policy.max_params_b = _tighter(op[2], size, "slo")  # inf: no size limit
        for key, value in constraints.items():
            if key in CEILINGS:
                setattr(policy, key, _tighter(_operator_limit(policy, key), value, key))
            elif key != "slo":
                setattr(policy, key, value)
        return policy

    def spend_cap(self, constraints: Mapping[str, Any] | None = None) -> float | None:
        """The hard spend cap of this layer's policy per period under ``constraints`` (None: its
        policy has none): what a call's reservation is checked against, with the operator's."""
        return self._policy_for(constraints or {}).spend_cap()

    def spent(self) -> float:
        """Spend of the current period so far, plus the reservations of calls still in flight
        (here and in other replicas sharing the ledger): what a budgeted decision may not exceed."""
        since = period_start(self.period)
        return float(self.ledger.spent(since=since, session=self.session)) + float(
            self.ledger.reserved(session=self.session)
        )

    def count_input_tokens(self, prompts: Sequence[str]) -> np.ndarray:
        """``(n, m)`` input tokens of the prompts on each pool model: what :meth:`decide` needs of
        the text alone, for a router to count before its encoder runs (``input_tokens=``)."""
        return self.cost_model.count_input_tokens(prompts)

    def decide(
        self,
        prompts: Sequence[str],
        quality: np.ndarray,
        models: Sequence[str],
        task_proba: np.ndarray,
        task_labels: Sequence[str],
        input_tokens: np.ndarray | None = None,
        uncertainty: Uncertainty | None = None,
        **constraints: Any,
    ) -> list[RoutingDecision]:
        """One decision per prompt, in order (so budgets see earlier ones): the router's hook.

        ``quality`` (n, c) over the candidate ``models`` (a subset of the fitted ones), ``task_proba``
        (n, L) over ``task_labels``; ``input_tokens``: :meth:`count_input_tokens` of the prompts
        when already counted; ``uncertainty``: the router's novelty and quality intervals over the
        same (n, c), carried into the decisions (and read by a risk-averse policy). One path for
        one prompt and for a batch."""
        if self.models_ is None:
            raise PolicyError(
                f"policy {self.policy.name!r} is not fitted: call DecisionLayer.fit_router(router) first"
            )
        fitted, models = self.models_, list(models)
        if models == fitted:
            cols: Sequence[int] = range(len(fitted))
            full = np.asarray(quality, dtype="float64")
        else:
            unknown = [m for m in models if m not in fitted]
            if unknown:
                raise PolicyError(
                    f"model(s) {unknown} were not among the models the policy was fitted on {fitted}; refit it"
                )
            # decide over the fitted columns (the policy's tables index them); non-candidates are infeasible
            cols = [fitted.index(m) for m in models]
            full = np.zeros((len(prompts), len(fitted)))
            full[:, cols] = quality
        lower = None
        if uncertainty is not None:
            lower = np.zeros_like(full)
            lower[:, list(cols)] = uncertainty.lower
        policy = self._policy_for(constraints)
        tidx = np.argmax(task_proba, axis=1).tolist()
        tasks = [task_labels[t] for t in tidx]
        est = self.estimates(prompts, full, fitted, tasks, task_proba=task_proba, input_tokens=input_tokens)
        est.quality_lower = lower
        if len(cols) != len(fitted):
            wanted = set(models)
            candidate = np.array([m in wanted for m in fitted], dtype=bool)
            est.feasible = np.repeat(candidate[None, :], len(est), axis=0)
        usable = policy.usable(est)
        if policy.stateful:
            # spend so far = the ledger plus the expected bills of this batch's earlier picks
            choice, pending, spent = [], 0.0, self.spent()
            for i in range(len(est)):
                j = policy.step(est.take(slice(i, i + 1)), spent + pending)
                choice.append(j)
                pending += float(est.cost[i, j])
        else:
            choice = policy.choose(est, usable).tolist()
        allowed = est.allowed
        confidence = np.max(task_proba, axis=1).tolist()  # the probability of the argmax task
        out = [
            self._decision(
                policy, est.take(slice(i, i + 1)), j, usable[i], allowed[i], confidence[i], models, cols
            )
            for i, j in enumerate(choice)
        ]
        if uncertainty is not None:
            for i, d in enumerate(out):
                with_uncertainty(d, uncertainty, i, models)
        queued = self._queue_note(fitted)
        if queued:
            for d in out:
                d.reason += queued
        return out

    def _queue_note(self, fitted: Sequence[str]) -> str:
        """What the live queues of local servers did to the first-token estimates of ``fitted``
        (``"; queue-aware TTFT: vllm-a: 12 waiting, 2 running, KV 91% -> TTFT est 4.2 s"``),
        "" when no fresh load raised any."""
        loads = self.latency_model.loads()
        if not loads:
            return ""
        seen = dict.fromkeys(loads[m].describe() for m in fitted if m in loads)  # each server once
        return f"; queue-aware TTFT: {'; '.join(seen)}" if seen else ""

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
        reason = policy.explain(row, j, usable)
        rule_tokens = policy.max_tokens_for(task)
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
        backend: str | None = None,
    ) -> bool:
        """Book a finished call: spend into the ledger (idempotent per ``request_id``; ``backend``:
        the catalog backend that served it, kept next to the model), the bill into the pacing
        policy, measured latency into the latency model."""
        model = decision.model if isinstance(decision, RoutingDecision) else decision
        if model not in self.pool:
            raise PolicyError(f"cannot record spend for unknown model {model!r}")
        extra = {} if backend is None else {"backend": backend}
        new = self.ledger.record(cost_usd, model, request_id=request_id, session=self.session, **extra)
        if new:
            expected = decision.expected_cost_usd if isinstance(decision, RoutingDecision) else None
            self.policy.observe_cost(float(expected if expected is not None else cost_usd), float(cost_usd))
        if ttft_s is not None or tokens_per_s is not None:
            self.latency_model.observe(model, ttft_s=ttft_s, tokens_per_s=tokens_per_s)
        return bool(new)


def with_uncertainty(d: RoutingDecision, u: Uncertainty, i: int, models: Sequence[str]) -> RoutingDecision:
    """Carry row ``i`` of ``u`` (over ``models``) into ``d``: novelty, intervals, and a reason that
    says when the guard leaned on the pool prior (weight >= 0.5: its estimates mostly the prior's,
    or the head's pick overruled for not beating the prior's model by the novelty margin) and the
    decision landed on the prior's own pick, the best single model."""
    nov, w = float(u.novelty[i]), float(u.shrink[i])
    lo, hi = u.lower[i].tolist(), u.upper[i].tolist()
    d.novelty = nov
    d.quality_interval = {m: (lo[k], hi[k]) for k, m in enumerate(models)}
    d.fell_back_to_prior = w >= 0.5 and d.model == u.prior_model
    if d.fell_back_to_prior:
        d.reason += (
            f"; novel prompt (novelty {nov:.2f}): prior weight {w:.0%}, "
            f"fell back to the prior's best model {u.prior_model}"
        )
    elif w >= 0.5:
        d.reason += f"; novel prompt (novelty {nov:.2f}): prior weight {w:.0%}"
    return d
