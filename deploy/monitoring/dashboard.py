"""The rlhf-grpc Grafana dashboard, as code (grafanalib).

Five rows: training (reward, KL, losses, clip fraction, logprob mismatch, staleness, step time by
phase, eval reward of evaluated and promoted versions), serving (tokens/s, latency p50/p99 per
service, errors, queue depth), adapters (active version per policy replica against the trainer's
latest, load latency, failed pushes) and the feedback loop (feedback per tenant, budget refusals
per tenant, reward-model versions and their held-out accuracy), and the canary of staged
versions (share, reward, errors and latency per arm, verdicts).

`generate.py` writes it as JSON into the monitoring component, where a ConfigMap carries it to
Grafana's dashboard sidecar; a test fails when the committed JSON differs from what this builds.
Every query is checked by promtool (tests/deploy/test_deploy.py) and run against a real Prometheus
scraping the real services (tests/deploy/test_prometheus_scrape.py).

Metric names are the services' own (DESIGN.md decision 12); `job` is the Service's
app.kubernetes.io/name (rlhf-policy, rlhf-reward, rlhf-trainer, rlhf-gateway).
"""

from __future__ import annotations

from grafanalib.core import (
    Dashboard,
    GridPos,
    RowPanel,
    Stat,
    Target,
    Template,
    Templating,
    Time,
    TimeSeries,
)

UID = "rlhf-grpc-overview"
TITLE = "rlhf-grpc: training, serving, adapters"
DATASOURCE = "${datasource}"
NS = 'namespace=~"$namespace"'
RATE = "$__rate_interval"
GRPC = 'rlhf_(policy|reward|trainer)_grpc'
# Server-side failures (as in alerts.yaml): not the caller's mistake, not load shedding.
SERVER_ERRORS = "UNKNOWN|INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS|UNIMPLEMENTED"

# The series of the feedback loop, in one place: the gateway's feedback and budget refusals (label
# `tenant` = API key id) and the reward service's model versions (label `version`).
FEEDBACK = "rlhf_gateway_feedback_total"
BUDGET_REFUSALS = "rlhf_gateway_budget_refusals_total"
REWARD_MODEL_ACTIVE = "rlhf_reward_model_active"
REWARD_MODEL_ACCURACY = "rlhf_reward_model_heldout_accuracy"
REWARD_MODEL_PUSHES = "rlhf_reward_model_pushes_total"

WIDTH = 24  # Grafana's grid is 24 columns wide
HEIGHT = 8


def figure(name: str) -> str:
    """One of the trainer's per-step figures (rlhf_trainer_step_figure{name=...})."""
    return f'rlhf_trainer_step_figure{{name="{name}", {NS}}}'


def quantiles(buckets: str, by: str, legend: str) -> list[Target]:
    """p50 and p99 of a histogram per `by`; `buckets` is a selector of its _bucket series."""
    return [
        Target(expr=f"histogram_quantile({q}, sum by ({by}, le) (rate({buckets}[{RATE}])))",
               legendFormat=f"{legend} p{int(q * 100)}", refId=ref)
        for q, ref in ((0.5, "A"), (0.99, "B"))
    ]


def series(title: str, targets: list[Target], unit: str = "short", description: str = "",
           stacked: bool = False) -> TimeSeries:
    return TimeSeries(
        title=title, description=description, dataSource=DATASOURCE, targets=targets, unit=unit,
        legendDisplayMode="table", legendCalcs=["lastNotNull", "max"],
        stacking={"mode": "normal", "group": "A"} if stacked else {},
        fillOpacity=30 if stacked else 0, tooltipMode="multi",
    )


def stat(title: str, expr: str, description: str = "") -> Stat:
    return Stat(title=title, description=description, dataSource=DATASOURCE,
                targets=[Target(expr=expr, refId="A", instant=True)],
                reduceCalc="lastNotNull", graphMode="none")


def t(expr: str, legend: str, ref: str = "A") -> Target:
    return Target(expr=expr, legendFormat=legend, refId=ref)


def training() -> list:
    return [
        stat("Step", f"max(rlhf_trainer_step{{{NS}}})", "Steps completed by the current run."),
        stat("Latest adapter version", f"max(rlhf_trainer_adapter_version{{{NS}}})",
             "The version the trainer pushed last."),
        stat("Samples / s", f"max({figure('samples_per_second')})",
             "Rollout samples per second of wall time, latest step."),
        stat("Waiting for a service", f"max(rlhf_trainer_waiting{{{NS}}})",
             "1 while the run retries calls to policy or reward."),
        series("Reward", [
            t(f"rlhf_trainer_reward_mean{{{NS}}}", "mean reward"),
            t(figure("reward_std"), "std within the step", "B"),
        ], description="Mean score of the step's samples, and their spread."),
        series("KL to the reference", [
            t(f"rlhf_trainer_kl{{{NS}}}", "KL (nats/sequence)"),
            t(figure("kl_coef"), "KL coefficient", "B"),
            t(figure("approx_kl"), "approx KL of the update", "C"),
        ], description="Mean KL of the policy to the base model (adapter off)."),
        series("Losses", [
            t(figure("policy_loss"), "policy loss"),
            t(figure("value_loss"), "value loss", "B"),
        ]),
        series("Clip fraction and entropy", [
            t(figure("clipfrac"), "clip fraction"),
            t(figure("entropy"), "entropy", "B"),
        ]),
        series("Logprob mismatch (vLLM vs trainer)", [
            t(figure("logprob_mismatch"), "mean |behaviour - recomputed|"),
        ], description="A rising gap is a bug or staleness (DESIGN.md decision 5)."),
        series("Staleness", [
            t(figure("staleness"), "adapter versions behind"),
        ], description="How many versions older than the trained one the rollouts were."),
        series("Step time by phase", [
            t(f"rlhf_trainer_phase_seconds{{{NS}}}", "{{phase}}"),
        ], unit="s", stacked=True),
        series("Eval reward (held-out prompts)", [
            t(f"rlhf_trainer_eval_reward_mean{{{NS}}}", "latest evaluated version"),
            t(f"rlhf_trainer_eval_reward_std{{{NS}}}", "its std", "B"),
            t(f"rlhf_trainer_eval_promoted_reward_mean{{{NS}}}", "promoted version", "C"),
        ], description="Mean reward of a version's completions on the eval prompts, scored "
                       "before it is promoted; a version more than max_eval_drop below the "
                       "promoted one is refused."),
        series("Evaluated versions", [
            t(f"max(rlhf_trainer_eval_version{{{NS}}})", "latest evaluated"),
            t(f"max(rlhf_trainer_eval_promoted_version{{{NS}}})", "promoted by eval", "B"),
            t(f"sum(increase(rlhf_trainer_eval_refused_total{{{NS}}}[{RATE}]))",
              "refused by the eval gate", "C"),
        ], description="A gap between evaluated and promoted: versions held back by their "
                       "eval reward."),
    ]


def serving() -> list:
    return [
        series("Generated tokens / s", [
            t(f"sum by (instance) (rate(rlhf_policy_generated_tokens_total{{{NS}}}[{RATE}]))",
              "{{instance}} generated"),
            t(f"sum(rate(rlhf_policy_prompt_tokens_total{{{NS}}}[{RATE}]))", "prompt (all)", "B"),
        ], unit="short"),
        series("gRPC latency p50 / p99", quantiles(
            f'{{__name__=~"{GRPC}_request_duration_seconds_bucket", {NS}}}', "job", "{{job}}"),
            unit="s"),
        series("Gateway latency p50 / p99", quantiles(
            f"rlhf_gateway_http_request_seconds_bucket{{{NS}}}", "route", "{{route}}"), unit="s"),
        series("Calls by status", [
            t(f'sum by (job, code) (rate({{__name__=~"{GRPC}_requests_total", {NS}}}[{RATE}]))',
              "{{job}} {{code}}"),
            t(f"sum by (status) (rate(rlhf_gateway_http_requests_total{{{NS}}}[{RATE}]))",
              "gateway {{status}}", "B"),
        ], unit="reqps"),
        series("Error ratio", [
            t(f'sum by (job) (rate({{__name__=~"{GRPC}_requests_total", code=~"{SERVER_ERRORS}", '
              f'{NS}}}[{RATE}])) / sum by (job) (rate({{__name__=~"{GRPC}_requests_total", '
              f'{NS}}}[{RATE}]))', "{{job}}"),
            t(f'sum(rate(rlhf_gateway_http_requests_total{{status=~"5..", {NS}}}[{RATE}])) / '
              f"sum(rate(rlhf_gateway_http_requests_total{{{NS}}}[{RATE}]))", "gateway 5xx", "B"),
        ], unit="percentunit", description="Server-side failures over all calls (alerts at 5%)."),
        series("Policy queue depth", [
            t(f"rlhf_policy_requests_waiting{{{NS}}}", "{{instance}} waiting"),
            t(f"rlhf_policy_requests_running{{{NS}}}", "{{instance}} running", "B"),
            t(f"rlhf_policy_pending_sequences{{{NS}}}", "{{instance}} admitted", "C"),
            t(f"sum by (instance) (rate(rlhf_policy_admission_rejected_total{{{NS}}}[{RATE}]))",
              "{{instance}} refused/s", "D"),
        ]),
        series("KV cache in use", [
            t(f"rlhf_policy_kv_cache_usage_ratio{{{NS}}}", "{{instance}}"),
        ], unit="percentunit"),
        series("Reward batching", [
            *quantiles(f"rlhf_reward_batch_wait_seconds_bucket{{{NS}}}", "scorer",
                       "wait {{scorer}}"),
            t(f"histogram_quantile(0.5, sum by (scorer, le) "
              f"(rate(rlhf_reward_batch_size_items_bucket{{{NS}}}[{RATE}])))",
              "items/batch {{scorer}} p50", "C"),
        ], unit="s"),
        series("Best-of-n: n requested", [
            t(f"histogram_quantile(0.5, sum by (le) (rate(rlhf_gateway_best_of_n_bucket{{{NS}}}"
              f"[{RATE}])))", "n p50"),
            t(f"histogram_quantile(0.99, sum by (le) (rate(rlhf_gateway_best_of_n_bucket{{{NS}}}"
              f"[{RATE}])))", "n p99", "B"),
        ]),
        series("Gateway upstream latency p99", [
            t(f"histogram_quantile(0.99, sum by (service, method, le) "
              f"(rate(rlhf_gateway_upstream_seconds_bucket{{{NS}}}[{RATE}])))",
              "{{service}} {{method}}"),
        ], unit="s"),
        series("Gateway upstream errors", [
            t(f"sum by (service, code) (rate(rlhf_gateway_upstream_errors_total{{{NS}}}[{RATE}]))",
              "{{service}} {{code}}"),
        ], unit="reqps", description="Failed gateway calls to policy and reward, by gRPC code."),
    ]


def adapters() -> list:
    return [
        series("Active adapter version per policy replica", [
            t(f"max by (instance) (rlhf_policy_active_adapter_version{{{NS}}})", "{{instance}}"),
            t(f"max(rlhf_trainer_adapter_version{{{NS}}})", "trainer latest", "B"),
        ], description="A replica below the trainer's line serves an older adapter "
                       "(alert RlhfPolicyAdapterBehind)."),
        series("Adapter load latency", [
            *quantiles(f"rlhf_policy_adapter_load_seconds_bucket{{{NS}}}", "instance",
                       "{{instance}}"),
        ], unit="s", description="Upload end to servable, per push."),
        series("Adapter pushes", [
            t(f"sum by (result) (increase(rlhf_policy_adapter_loads_total{{{NS}}}[{RATE}]))",
              "replica loads {{result}}"),
            t(f"sum(increase(rlhf_trainer_push_failures_total{{{NS}}}[{RATE}]))",
              "trainer: refused pushes", "B"),
        ], description="Failed pushes: 'refused' and 'failed' results, and the trainer's count."),
        series("Loaded adapter versions", [
            t(f"rlhf_policy_loaded_adapters{{{NS}}}", "{{instance}}"),
        ]),
    ]


def feedback_loop() -> list:
    return [
        Stat(title="Active reward model", dataSource=DATASOURCE, textMode="name",
             description="The reward-model version Score calls use now.",
             targets=[Target(expr=f"max by (version) ({REWARD_MODEL_ACTIVE}{{{NS}}}) == 1",
                             legendFormat="{{version}}", refId="A", instant=True)],
             reduceCalc="lastNotNull", graphMode="none"),
        Stat(title="Its held-out accuracy", dataSource=DATASOURCE, format="percentunit",
             description="Accuracy on held-out preference pairs, as the active version's push "
                         "reported it.",
             targets=[Target(expr=f"max({REWARD_MODEL_ACCURACY}{{{NS}}} and on (version) "
                                  f"({REWARD_MODEL_ACTIVE}{{{NS}}} == 1))",
                             refId="A", instant=True)],
             reduceCalc="lastNotNull", graphMode="none"),
        stat("Feedback today", f"sum(increase({FEEDBACK}{{{NS}}}[1d]))",
             "Choices and ratings stored over the last 24 hours, all tenants."),
        stat("Budget refusals today", f"sum(increase({BUDGET_REFUSALS}{{{NS}}}[1d]))",
             "429s for a spent request, sequence or token budget over the last 24 hours."),
        series("Feedback per tenant", [
            t(f"sum by (tenant, kind) (rate({FEEDBACK}{{{NS}}}[{RATE}])) * 60",
              "{{tenant}} {{kind}}"),
        ], unit="short", stacked=True,
            description="Choices and ratings stored per minute, by tenant (API key id)."),
        series("Budget refusals per tenant", [
            t(f"sum by (tenant, budget) (rate({BUDGET_REFUSALS}{{{NS}}}[{RATE}])) * 60",
              "{{tenant}} {{budget}}"),
        ], unit="short",
            description="429s per minute by tenant and budget (requests, sequences, tokens): a "
                        "tenant here often is sized too small or floods."),
        series("Reward-model versions", [
            t(f"max by (version) ({REWARD_MODEL_ACTIVE}{{{NS}}})", "{{version}}"),
        ], description="1 while a version is active, 0 while it is only kept (rollback "
                       "targets); a step is a swap."),
        series("Reward-model held-out accuracy", [
            t(f"max by (version) ({REWARD_MODEL_ACCURACY}{{{NS}}})", "{{version}}"),
        ], unit="percentunit",
            description="Per kept version, as the loop measured it before pushing."),
        series("Reward-model pushes", [
            t(f"sum by (result) (increase({REWARD_MODEL_PUSHES}{{{NS}}}[{RATE}]))",
              "{{result}}"),
        ], description="PushRewardModel calls by result: refused pushes never served."),
    ]


def canary() -> list:
    requests = f"rlhf_gateway_canary_requests_total{{{NS}}}"
    return [
        stat("Canary running", f"max(rlhf_gateway_canary_active{{{NS}}})",
             "1 while a staged version serves its canary share or its verdict is applied."),
        stat("Canary version", f"max(rlhf_gateway_canary_version{{{NS}}})",
             "Adapter version of the latest canary trial."),
        stat("Rollbacks today",
             f'sum(increase(rlhf_gateway_canary_decisions_total{{decision="rolled_back", '
             f'{NS}}}[1d]))', "Staged versions the canary rolled back over the last 24 hours "
                              "(alert RlhfCanaryRolledBack)."),
        stat("Promotions today",
             f'sum(increase(rlhf_gateway_canary_decisions_total{{decision="promoted", '
             f'{NS}}}[1d]))', "Staged versions the canary activated on every replica."),
        series("Canary share of policy traffic", [
            t(f'sum(rate(rlhf_gateway_canary_requests_total{{arm="candidate", {NS}}}[{RATE}])) '
              f"/ sum(rate({requests}[{RATE}]))", "candidate"),
        ], unit="percentunit",
            description="Requests the candidate served among those of the trial; never above "
                        "the gateway's canary_fraction."),
        series("Canary reward per arm", [
            t(f"max by (arm) (rlhf_gateway_canary_reward_mean{{{NS}}})", "{{arm}}"),
        ], description="Mean reward of the running trial's scored answers; the verdict tests "
                       "the candidate's against the incumbent's minus the margin."),
        series("Canary error rate per arm", [
            t(f'sum by (arm) (rate(rlhf_gateway_canary_requests_total{{outcome="error", {NS}}}'
              f"[{RATE}])) / sum by (arm) (rate({requests}[{RATE}]))", "{{arm}}"),
        ], unit="percentunit"),
        series("Canary latency per arm", [
            *quantiles(f"rlhf_gateway_canary_request_seconds_bucket{{{NS}}}", "arm", "{{arm}}"),
        ], unit="s"),
        series("Canary verdicts", [
            t(f"sum by (decision) (increase(rlhf_gateway_canary_decisions_total{{{NS}}}"
              f"[{RATE}]))", "{{decision}}"),
            t(f"sum(increase(rlhf_gateway_canary_apply_failures_total{{{NS}}}[{RATE}]))",
              "failed replica calls", "B"),
        ], description="promoted, rolled_back, superseded (committed or dropped by someone "
                       "else); failed calls are retried (alert RlhfCanaryStuck)."),
    ]


def _layout(rows: list[tuple[str, list]]) -> list:
    """Rows of panels on the grid: stats four to a line, time series two to a line."""
    panels, y = [], 0
    for title, row in rows:
        panels.append(RowPanel(title=title, gridPos=GridPos(h=1, w=WIDTH, x=0, y=y)))
        y += 1
        x = h_prev = 0
        for panel in row:
            w, h = (6, 4) if isinstance(panel, Stat) else (12, HEIGHT)
            if x + w > WIDTH:
                x, y = 0, y + h_prev
            panel.gridPos = GridPos(h=h, w=w, x=x, y=y)
            x += w
            h_prev = h
        y += h_prev
    return panels + [p for _, row in rows for p in row]


def build() -> Dashboard:
    datasource = Template(name="datasource", label="Data source", query="prometheus",
                          type="datasource")
    namespace = Template(name="namespace", label="Namespace", dataSource=DATASOURCE,
                         query='label_values(up{job=~"rlhf-.*"}, namespace)',
                         includeAll=True, allValue=".*", default="$__all", multi=True)
    return Dashboard(
        title=TITLE, uid=UID, tags=["rlhf-grpc"], timezone="browser", refresh="30s",
        time=Time("now-6h", "now"), editable=False, graphTooltip=1,
        description="Training, serving, adapters and the feedback loop of rlhf-grpc (generated by "
                    "deploy/monitoring/dashboard.py; do not edit by hand).",
        templating=Templating(list=[datasource, namespace]),
        panels=_layout([("Training", training()), ("Serving", serving()),
                        ("Adapters", adapters()),
                        ("Canary", canary()), ("Feedback loop", feedback_loop())]),
    ).auto_panel_ids()


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of a dashboard's JSON."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets") or []:
            out.append((panel["title"], target["expr"]))
    return out
