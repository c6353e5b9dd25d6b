//! The pages' HTML (maud escapes every value it is given) and the one
//! figure they compute: a job's progress (its ETA is the store's, as
//! `status` shows it).

use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::{PAGE_FAILURES, REFRESH_SECS};
use crate::job::scheduler::ScheduleStatus;
use crate::store::{Failures, JobCounts};

/// How far a job is, as the pages show it.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq)]
pub struct Progress {
    /// Rows settled: every row but the pending ones.
    pub rows_done: i64,
    pub rows: i64,
    /// `rows_done` of `rows`, 0 to 100 (100 once the job is done).
    pub percent: f64,
    /// Since the run started: until it ended, or until now.
    pub duration_secs: Option<f64>,
    /// The job's ETA, as `status` gives it: its calls left at the rate the
    /// shared limiter grants its account, and its quota.
    pub eta_secs: Option<f64>,
}

fn parse(t: Option<&str>) -> Option<DateTime<Utc>> {
    t.and_then(|t| DateTime::parse_from_rfc3339(t).ok()).map(|t| t.with_timezone(&Utc))
}

pub fn progress(c: &JobCounts, now: DateTime<Utc>) -> Progress {
    let rows_done = (c.rows - c.pending).max(0);
    let percent = if c.state == "done" {
        100.0
    } else if c.rows > 0 {
        (rows_done as f64 * 100.0 / c.rows as f64).clamp(0.0, 100.0)
    } else {
        0.0
    };
    let secs = |a: DateTime<Utc>, b: DateTime<Utc>| (b - a).num_milliseconds() as f64 / 1000.0;
    let started = parse(c.times.started_at.as_deref());
    let end = parse(c.times.finished_at.as_deref()).unwrap_or(now);
    let duration_secs = started.map(|s| secs(s, end).max(0.0));
    let eta_secs = c.eta_secs.filter(|&s| s > 0.0);
    Progress { rows_done, rows: c.rows, percent, duration_secs, eta_secs }
}

/// `95 s`, `4 min 10 s`, `2 h 05 min`.
fn span(secs: f64) -> String {
    let s = secs.round() as i64;
    match s {
        ..120 => format!("{s} s"),
        120..7200 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
    }
}

/// An RFC 3339 time as `2026-12-04 15:57:36` (the pages say once that
/// times are UTC).
fn when(t: Option<&str>) -> String {
    parse(t).map_or_else(|| "-".to_string(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

/// Thousands separated, so a million reads as one.
fn n(v: i64) -> String {
    let digits = v.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if v < 0 { format!("-{out}") } else { out }
}

/// At most `max` characters of a reason, for the list.
fn short(s: &str, max: usize) -> String {
    if s.chars().count() <= max { s.to_string() } else { format!("{}…", s.chars().take(max).collect::<String>()) }
}

/// What the ETA column says: a time left, or why there is none.
fn eta(c: &JobCounts, p: &Progress) -> String {
    match (c.state.as_str(), p.eta_secs) {
        (_, Some(s)) => format!("~{}", span(s)),
        ("running", None) if c.pending > 0 => "measuring…".to_string(),
        ("running" | "writing", None) => "finishing".to_string(),
        ("paused", _) => "paused".to_string(),
        ("waiting", _) => "waiting".to_string(),
        ("planning", _) => "planning".to_string(),
        _ => "-".to_string(),
    }
}

const CSS: &str = r#"
:root { color-scheme: light; }
body { font: 16px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; margin: 0; color: #111827; background: #f3f4f6; }
header { background: #111827; color: #f9fafb; padding: 14px 24px; display: flex; align-items: baseline; gap: 24px; flex-wrap: wrap; }
header h1 { font-size: 22px; margin: 0; }
header a { color: #f9fafb; }
.meta { color: #d1d5db; font-size: 14px; }
main { padding: 16px 24px 32px; }
.summary { display: flex; gap: 10px; margin: 0 0 14px; flex-wrap: wrap; }
.pill, .badge { display: inline-block; font-weight: 700; border-radius: 4px; color: #fff; background: #4b5563; text-transform: uppercase; letter-spacing: .03em; }
.pill { padding: 4px 12px; font-size: 15px; }
.badge { padding: 2px 10px; font-size: 14px; }
.s-failed { background: #b91c1c; } .s-paused { background: #a16207; } .s-waiting { background: #c2410c; }
.s-running { background: #1d4ed8; } .s-done { background: #15803d; } .s-cancelled { background: #6b7280; }
.s-planning, .s-writing { background: #6d28d9; }
table { border-collapse: collapse; background: #fff; width: 100%; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
th, td { text-align: left; padding: 9px 12px; border-bottom: 1px solid #e5e7eb; vertical-align: top; }
th { font-size: 13px; color: #4b5563; text-transform: uppercase; letter-spacing: .04em; background: #f9fafb; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.row-failed td { background: #fee2e2; } tr.row-paused td, tr.row-waiting td { background: #fef3c7; }
tr.row-failed td:first-child { box-shadow: inset 6px 0 #b91c1c; }
tr.row-paused td:first-child, tr.row-waiting td:first-child { box-shadow: inset 6px 0 #a16207; }
.reason { font-size: 14px; color: #7f1d1d; margin-top: 4px; max-width: 46em; overflow-wrap: anywhere; }
tr.row-paused .reason, tr.row-waiting .reason { color: #713f12; }
progress { width: 150px; height: 16px; vertical-align: middle; -webkit-appearance: none; appearance: none;
           border: 0; border-radius: 3px; background: #d1d5db; --bar: #1d4ed8; }
progress::-webkit-progress-bar { background: #d1d5db; border-radius: 3px; }
progress::-webkit-progress-value { background: var(--bar); border-radius: 3px; }
progress::-moz-progress-bar { background: var(--bar); }
progress.bar-failed { --bar: #b91c1c; } progress.bar-paused, progress.bar-waiting { --bar: #a16207; }
progress.bar-done { --bar: #15803d; } progress.bar-cancelled { --bar: #6b7280; }
td.nowrap, td.nowrap a { white-space: nowrap; }
#quota progress { width: 100%; }
.pct { font-weight: 700; margin-left: 6px; font-variant-numeric: tabular-nums; }
.sub { font-size: 13px; color: #4b5563; }
a { color: #1d4ed8; }
.bad { color: #b91c1c; font-weight: 700; }
.box { background: #fff; padding: 14px 18px; margin-bottom: 16px; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.box h2 { font-size: 17px; margin: 0 0 8px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(290px, 1fr)); gap: 16px; margin-bottom: 16px; }
.grid .box { margin: 0; }
.grid table { box-shadow: none; } .grid td { padding: 4px 8px; } .grid td { white-space: nowrap; }
.alert { padding: 12px 18px; margin-bottom: 16px; font-size: 17px; border-left: 8px solid; }
.alert-failed { background: #fee2e2; border-color: #b91c1c; color: #7f1d1d; }
.alert-paused, .alert-waiting { background: #fef3c7; border-color: #a16207; color: #713f12; }
.alert-other { background: #e0e7ff; border-color: #1d4ed8; }
.big progress { width: 100%; height: 22px; }
code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 14px; }
.next { background: #ecfdf5; border-left: 8px solid #15803d; padding: 10px 16px; margin-top: 12px; }
"#;

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta http-equiv="refresh" content=(REFRESH_SECS);
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) }
            style { (PreEscaped(CSS)) }
        }
    }
}

fn top(now: DateTime<Utc>, back: bool) -> Markup {
    html! {
        header {
            h1 { @if back { a href="/" { "vinetl jobs" } } @else { "vinetl jobs" } }
            span.meta { "updated " (now.format("%H:%M:%S UTC")) " · refreshes every " (REFRESH_SECS) " s · times in UTC · read-only" }
        }
    }
}

fn badge(state: &str) -> Markup {
    html! { span class={ "badge s-" (state) } data-state=(state) { (state) } }
}

/// The job list: one row per recent job, the troubled ones tinted, with why.
pub fn list(jobs: &[JobCounts], schedules: &[ScheduleStatus], now: DateTime<Utc>) -> Markup {
    let mut by_state: std::collections::BTreeMap<&str, usize> = Default::default();
    for j in jobs {
        *by_state.entry(j.state.as_str()).or_default() += 1;
    }
    let order = ["failed", "paused", "waiting", "running", "planning", "writing", "done", "cancelled"];
    let trouble = by_state.get("failed").copied().unwrap_or(0);
    let title = if trouble > 0 { format!("{trouble} failed · vinetl jobs") } else { "vinetl jobs".to_string() };
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(&title))
            body {
                (top(now, false))
                main {
                    p.summary {
                        @for s in order {
                            @if let Some(k) = by_state.get(s) {
                                span class={ "pill s-" (s) } { (k) " " (s) }
                            }
                        }
                        @if jobs.is_empty() { "No jobs yet: `vinetl submit` or `vinetl run` a spec." }
                    }
                    table #jobs {
                        thead { tr {
                            th { "Job" } th { "Name" } th { "State" } th { "Progress" } th.num { "Rows" }
                            th.num { "Calls" } th.num { "Failed" } th { "Started" } th { "Duration" } th { "ETA" }
                        } }
                        tbody {
                            @for c in jobs { (list_row(c, now)) }
                        }
                    }
                    @if !schedules.is_empty() { (schedule_table(schedules)) }
                }
            }
        }
    }
}

fn list_row(c: &JobCounts, now: DateTime<Utc>) -> Markup {
    let p = progress(c, now);
    html! {
        tr class={ "job row-" (c.state) } data-job=(c.job_id) data-state=(c.state) data-percent=(format!("{:.1}", p.percent)) {
            td { a href={ "/jobs/" (c.job_id) } { (c.job_id) } }
            td.nowrap { a href={ "/jobs/" (c.job_id) } { (c.name) } }
            td {
                (badge(&c.state))
                @if let Some(r) = c.state_reason.as_deref().filter(|_| c.state != "running") {
                    div.reason { (short(r, 160)) }
                }
            }
            td.nowrap {
                progress class={ "bar-" (c.state) } max="100" value=(format!("{:.1}", p.percent)) {}
                span.pct { (format!("{:.0}%", p.percent.floor())) }
                div.sub {
                    (n(p.rows_done)) " of " (n(p.rows)) " rows"
                    @if c.failed > 0 { ", " span.bad { (n(c.failed)) " failed" } }
                }
            }
            td.num { (n(c.rows)) }
            td.num { (n(c.calls_made)) }
            td.num {
                @if c.failed > 0 { span.bad { (n(c.failed)) } } @else { "0" }
                @if c.dead_lettered_batches > 0 { div.sub { (c.dead_lettered_batches) " dead batches" } }
            }
            td.nowrap { (when(c.times.started_at.as_deref())) }
            td { (p.duration_secs.map_or("-".to_string(), span)) }
            td.eta { (eta(c, &p)) }
        }
    }
}

/// The schedules: next run, last run, and the nights that did not run
/// (missed while no scheduler ran, failed, or overdue right now).
fn schedule_table(schedules: &[ScheduleStatus]) -> Markup {
    html! {
        h2 { "Schedules" }
        table #schedules {
            thead { tr {
                th { "Schedule" } th { "Cron" } th { "Next run" } th { "Last run" } th { "Missed nights" }
            } }
            tbody {
                @for s in schedules {
                    @let trouble = s.overdue > 0 || !s.missed.is_empty() || s.problem.is_some();
                    tr class={ "schedule" @if trouble { " row-failed" } } data-schedule=(s.name)
                        data-missed=(s.missed.len()) data-overdue=(s.overdue) {
                        td.nowrap { (s.name) }
                        td.nowrap { code { (s.schedule) } " " span.sub { (s.timezone) } }
                        td.nowrap.next-run {
                            (when(s.next_run.as_deref()))
                            @if let Some(d) = &s.next_date { div.sub { "date " (d) } }
                        }
                        td.last-run {
                            @if let Some(r) = &s.last_run {
                                (r.logical_date) " "
                                @if let Some(j) = r.job_id { a href={ "/jobs/" (j) } { "job " (j) } " " }
                                (badge(r.job_state.as_deref().unwrap_or(&r.state)))
                            } @else { "never" }
                            @for r in &s.pending {
                                div.sub { (r.logical_date) " " (r.state) ": " (short(r.reason.as_deref().unwrap_or("to start"), 120)) }
                            }
                        }
                        td.missed {
                            @if let Some(p) = &s.problem { div.reason { (short(p, 160)) } }
                            @if s.overdue > 0 {
                                div.reason { (s.overdue) " overdue: no scheduler is running" }
                            }
                            @for r in &s.missed {
                                div.reason {
                                    (r.logical_date) " " (r.state)
                                    @if let Some(j) = r.job_id { " (" a href={ "/jobs/" (j) } { "job " (j) } ")" }
                                    ": " (short(r.reason.as_deref().unwrap_or_default(), 160))
                                }
                            }
                            @if !trouble { "none" }
                        }
                    }
                }
            }
        }
    }
}

fn kv(rows: &[(&str, String)]) -> Markup {
    html! {
        table { @for (k, v) in rows { tr { td { (k) } td.num { (v) } } } }
    }
}

/// One job: state and why, progress, counts, calls by outcome, quota,
/// times, outputs and what failed.
pub fn job(c: &JobCounts, f: &Failures, now: DateTime<Utc>) -> Markup {
    let p = progress(c, now);
    let alert = match c.state.as_str() {
        "failed" => "alert-failed",
        "paused" => "alert-paused",
        "waiting" => "alert-waiting",
        _ => "alert-other",
    };
    let invalid: i64 = c.invalid.values().sum();
    let kinds: Vec<String> = c.invalid.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let k = &c.calls;
    let t = &c.times;
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(&format!("job {} ({}): {} · vinetl", c.job_id, c.name, c.state)))
            body {
                (top(now, true))
                main {
                    h2 #title { "Job " (c.job_id) " · " (c.name) " " (badge(&c.state)) }
                    @if let Some(r) = &c.state_reason {
                        div class={ "alert " (alert) } #reason { (r) }
                    }
                    div.box.big {
                        progress #progress class={ "bar-" (c.state) } max="100" value=(format!("{:.1}", p.percent)) {}
                        p {
                            strong { (format!("{:.0}%", p.percent.floor())) } " · " (n(p.rows_done)) " of " (n(p.rows))
                            " rows settled"
                            @if c.failed > 0 { " (" span.bad { (n(c.failed)) " failed" } ")" }
                            " · " (n(c.batches_done)) " of " (n(c.batches)) " batches done · ETA " (eta(c, &p))
                            @if let Some(d) = p.duration_secs { " · running for " (span(d)) }
                        }
                    }
                    div.grid {
                        div.box #counts {
                            h2 { "Rows" }
                            (kv(&[
                                ("read", n(c.rows)), ("valid", n(c.valid)),
                                ("invalid", if kinds.is_empty() { n(invalid) } else { format!("{} ({})", n(invalid), kinds.join(", ")) }),
                                ("duplicates", n(c.duplicates)), ("cache hits", n(c.cache_hits)),
                                ("decoded", n(c.decoded)), ("failed", n(c.failed)), ("pending", n(c.pending)),
                            ]))
                        }
                        div.box #calls {
                            h2 { "Calls by outcome" }
                            (kv(&[
                                ("calls made", n(c.calls_made)), ("answered", n(k.answered)), ("429s", n(k.rate_limited)),
                                ("5xx", n(k.server_error)), ("timed out", n(k.timed_out)), ("other errors", n(k.other_error)),
                                ("answers lost", n(k.answer_lost)), ("in flight", n(k.in_flight)), ("retried", n(c.calls_retried)),
                                ("dead-lettered", format!("{} VINs in {} batches", n(c.dead_lettered_vins), n(c.dead_lettered_batches))),
                            ]))
                        }
                        div.box #quota {
                            h2 { "Quota today" }
                            @match &c.quota {
                                Some(q) => {
                                    @match q.daily_quota {
                                        Some(d) => p { strong { (n(q.used_today)) } " of " (n(d)) " used" },
                                        None => p { strong { (n(q.used_today)) } " calls today (no daily quota)" },
                                    }
                                    @if let Some(d) = q.daily_quota.filter(|d| *d > 0) {
                                        progress max=(d) value=(q.used_today.min(d)) {}
                                    }
                                    p.sub { "account " span.mono { (q.account) } }
                                    @if q.daily_quota.is_some() { p.sub { "resets " (when(q.resets_at.as_deref())) } }
                                }
                                None => { p.sub { "no limiter row for this job's account yet" } }
                            }
                            @if let Some(r) = &c.recalls {
                                h2 { "Recalls" }
                                (kv(&[("lookups", n(r.lookups)), ("cached", n(r.cache_hits)), ("calls", n(r.calls)), ("failed for good", n(r.failed))]))
                            }
                        }
                        div.box #times {
                            h2 { "Times" }
                            (kv(&[
                                ("created", when(t.created_at.as_deref())), ("started", when(t.started_at.as_deref())),
                                ("planned", when(t.planned_at.as_deref())), ("writing", when(t.write_started_at.as_deref())),
                                ("finished", when(t.finished_at.as_deref())),
                                ("duration", p.duration_secs.map_or("-".to_string(), span)),
                            ]))
                        }
                    }
                    div.box #outputs {
                        h2 { "Outputs" }
                        @if c.outputs.is_empty() { p.sub { "none written yet" } }
                        ul { @for o in &c.outputs { li.mono { (o) } } }
                    }
                    (failures(f))
                }
            }
        }
    }
}

fn failures(f: &Failures) -> Markup {
    let more = |shown: usize, total: i64| (shown as i64) < total;
    html! {
        div.box #failures {
            h2 { "Failures: " (n(f.dead_batches_total)) " dead-lettered batches, " (n(f.failed_rows_total)) " failed rows" }
            @for e in &f.job_errors {
                div.alert.alert-failed { strong { (e.code) } " " (when(e.at.as_deref())) ": " (e.text) }
            }
            @if !f.dead_batches.is_empty() {
                table #dead-batches {
                    thead { tr { th.num { "Batch" } th { "Kind" } th.num { "VINs" } th.num { "Attempts" } th { "Given up at" } th { "Last error" } } }
                    tbody { @for b in &f.dead_batches { tr {
                        td.num { (b.batch_no) } td { (b.kind) } td.num { (b.vins) } td.num { (b.attempts) }
                        td { (when(b.updated_at.as_deref())) } td { (b.last_error.as_deref().unwrap_or("-")) }
                    } } }
                }
                @if more(f.dead_batches.len(), f.dead_batches_total) {
                    p.sub { "The first " (f.dead_batches.len()) " of " (n(f.dead_batches_total)) ": " code { "vinetl failures " (f.job_id) " --limit N" } " lists more." }
                }
            }
            @if !f.failed_rows.is_empty() {
                table #failed-rows {
                    thead { tr { th { "Source" } th.num { "Row" } th { "VIN as read" } th { "Error" } th.num { "Batch" } } }
                    tbody { @for r in &f.failed_rows { tr {
                        td.mono { (r.source) } td.num { (r.row) } td.mono { (format!("{:?}", r.raw_vin)) }
                        td { strong { (r.error_code.as_deref().unwrap_or("-")) } " " (r.error_text.as_deref().unwrap_or("")) }
                        td.num { (r.batch_no.map_or("-".to_string(), |b| b.to_string())) }
                    } } }
                }
                @if more(f.failed_rows.len(), f.failed_rows_total) {
                    p.sub { "The first " (PAGE_FAILURES.min(f.failed_rows_total)) " of " (n(f.failed_rows_total)) ": " code { "vinetl failures " (f.job_id) " --limit N" } " lists more." }
                }
            }
            @if f.dead_batches_total == 0 && f.failed_rows_total == 0 && f.job_errors.is_empty() {
                p.sub { "Nothing failed." }
            }
            @if f.dead_batches_total > 0 || f.failed_rows_total > 0 {
                div.next {
                    "Next: " code { "vinetl reprocess " (f.job_id) " --failed-only" }
                    @if matches!(f.state.as_str(), "done" | "failed" | "cancelled") { " retries only these rows." }
                    @else { " retries only these rows, once the job has ended." }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_text_is_escaped_and_the_eta_is_the_stores() {
        let now = DateTime::parse_from_rfc3339("2026-01-01T00:01:40Z").unwrap().with_timezone(&Utc);
        let mut c = JobCounts {
            job_id: 3,
            name: "<script>alert(1)</script>".into(),
            state: "running".into(),
            rows: 1000,
            pending: 600,
            batches: 50,
            batches_done: 20,
            ..JobCounts::default()
        };
        c.times.started_at = Some("2026-01-01T00:00:00Z".into());
        c.times.planned_at = Some("2026-01-01T00:00:20Z".into());
        c.eta_secs = Some(120.0);
        let p = progress(&c, now);
        assert_eq!((p.rows_done, p.percent, p.duration_secs), (400, 40.0, Some(100.0)));
        assert_eq!(p.eta_secs, Some(120.0));
        let page = list(std::slice::from_ref(&c), &[], now).into_string();
        assert!(!page.contains("id=\"schedules\""), "no schedules, no table");
        assert!(!page.contains("<script>alert"), "escaped: {page}");
        assert!(page.contains("&lt;script&gt;"));
        assert!(page.contains("~2 min 00 s"), "{page}");
        c.state = "paused".into();
        c.eta_secs = None;
        assert_eq!(progress(&c, now).eta_secs, None);
        assert_eq!(n(1234567), "1,234,567");
        assert_eq!(span(8000.0), "2 h 13 min");
    }
}
