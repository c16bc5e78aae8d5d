//! The timeline as an SVG, drawn with plotters: three panels over the same seconds — every
//! checkpoint of the primary as a bar as high as the interval before it (log scale), the
//! counter client's replies with the longest gap of the failover, the secondary's CPU — with
//! passive mode shaded, the phases and the kill marked across, and a legend under them.
//!
//! A checkpoint's details (sequence number, trigger, pause, pages) were once a hover title on
//! its bar; plotters writes no `<title>` elements, and the JSON summary (`--json`) lists every
//! checkpoint with them.

use colo_tests::timeline::{self, anchored, bold, rgb, text, Area, DrawError, Key, TimeChart};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};

use crate::{f, failover_gap, n, Args, Outcome};

const W: u32 = 1200;
const H: u32 = 680;
/// The label area left of the panels and the margin right of them.
const SIDES: (u32, u32) = (80, 30);
/// Where the header ends and each panel begins, top to bottom; the legend takes the rest.
const BREAKS: [u32; 4] = [84, 380, 440, 600];

const COLO: RGBColor = rgb(0x3274a1);
const PASSIVE: RGBColor = rgb(0xe1812c);
const PASSIVE_MODE: RGBColor = rgb(0xfde3c8);
const CPU: RGBColor = rgb(0x6a3d9a);
const PHASE: RGBColor = rgb(0x555555);

/// The checkpoint panel's range: 10 ms to 10 s, log scale.
const INTERVAL_MS: (f64, f64) = (10.0, 10_000.0);

/// The SVG.
pub fn timeline(o: &Outcome, args: &Args) -> Result<String, DrawError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        draw(&root, o, args)?;
        root.present()?;
    }
    Ok(svg)
}

fn draw(root: &Area, o: &Outcome, args: &Args) -> Result<(), DrawError> {
    root.fill(&WHITE)?;
    let areas = root.split_by_breakpoints([] as [u32; 0], BREAKS);
    let [head, a, b, c, foot] = &areas[..] else { unreachable!("four breaks make five areas") };
    let time = o.colo_start_t - 0.5..o.end_t + 0.5;
    let left = SIDES.0 as i32;

    let ck = &o.primary["checkpoints"];
    let summary = format!(
        "{} checkpoints ({} COLO, {} passive), {} mode switches, pause p50 {:.1} ms / p99 {:.1} ms; max-time {} ms, passive-count {}",
        n(&ck["total"]),
        n(&ck["colo"]),
        n(&ck["passive"]),
        n(&ck["mode-switches"]),
        f(&o.primary["pause-p50-ms"]),
        f(&o.primary["pause-p99-ms"]),
        args.max_time,
        args.passive_count
    );
    timeline::header(
        head,
        left,
        "COLO demo: every checkpoint of the primary, the counter client, the secondary's CPU",
        &[summary],
    )?;

    // Panel A: the checkpoints.
    let key_ms = vec![10.0, 100.0, 1000.0, 10_000.0];
    let y = (INTERVAL_MS.0..INTERVAL_MS.1).log_scale().with_key_points(key_ms);
    let mut ca = timeline::time_chart(a, time.clone(), y, SIDES, (0, 12), false)?;
    passive_bands(&mut ca, o)?;
    timeline::mesh(&mut ca, Some(rgb(0xdddddd)))
        .y_label_formatter(&|ms| if *ms >= 1000.0 { format!("{} s", ms / 1000.0) } else { format!("{ms} ms") })
        .y_desc("interval before the checkpoint (log)")
        .draw()?;
    timeline::frame(&ca)?;
    markers(&ca, o)?;
    checkpoints(&mut ca, o, time.end - time.start)?;
    let names = o.phases.iter().map(|ph| (ph.start, ph.name.to_string()));
    timeline::labels_at(head, &ca, names, BREAKS[0] as i32 - 4, rgb(0x222222))?;
    takeover(&ca, o, args)?;

    // Panel B: the counter's replies.
    let mut cb = timeline::time_chart(b, time.clone(), 0.0..1.0, SIDES, (18, 14), false)?;
    passive_bands(&mut cb, o)?;
    timeline::label_left(&cb, 0.5, "counter", text(12.0, timeline::GREY))?;
    timeline::frame(&cb)?;
    markers(&cb, o)?;
    timeline::ticks(&mut cb, o.replies.iter().map(|r| r.0), 0.15..0.85, timeline::TRAFFIC.stroke_width(1))?;
    longest_gap(&mut cb, o)?;

    // Panel C: the secondary's CPU, and the time axis.
    let cpu_max = o.cpu.share.iter().map(|s| s.1).fold(1.0f64, f64::max);
    let mut cc = timeline::time_chart(c, time, 0.0..cpu_max, SIDES, (0, 0), true)?;
    passive_bands(&mut cc, o)?;
    timeline::mesh(&mut cc, Some(rgb(0xeeeeee)))
        .y_labels(3)
        .y_label_formatter(&|s| format!("{:.0}%", s * 100.0))
        .y_desc("secondary CPU")
        .draw()?;
    timeline::frame(&cc)?;
    markers(&cc, o)?;
    cc.draw_series(LineSeries::new(o.cpu.share.iter().copied(), CPU.stroke_width(2)))?;

    let entries = [
        (Key::Swatch(COLO.to_rgba()), "COLO checkpoint"),
        (Key::Swatch(PASSIVE.to_rgba()), "passive checkpoint"),
        (Key::Swatch(PASSIVE_MODE.to_rgba()), "passive mode"),
        (Key::Dot(timeline::ALARM.to_rgba()), "triggered by a miscompare"),
        (Key::Tick(timeline::TRAFFIC.to_rgba()), "counter reply"),
        (Key::Line(CPU.to_rgba()), "secondary colo-vmm CPU (1 s window)"),
        (Key::Dashed(PHASE.to_rgba()), "a phase begins"),
    ];
    let below = timeline::legend(foot, &entries, left, (W - SIDES.1) as i32, 14)?;
    foot.draw(&Text::new(
        "bar height: how long the VMs ran before the checkpoint; periodic COLO checkpoints come after max-time, \
         passive ones every passive-time; time in seconds since the demo started",
        (left, below),
        text(12.0, rgb(0x666666)),
    ))?;
    Ok(())
}

/// Passive mode, shaded: from a passive checkpoint to the next COLO one (or the kill).
fn passive_bands<Y: Ranged<ValueType = f64>>(chart: &mut TimeChart<'_, '_, Y>, o: &Outcome) -> Result<(), DrawError> {
    let mut since: Option<f64> = None;
    let mut bands = vec![];
    for ck in &o.ckpts {
        match (ck.passive, since) {
            (true, None) => since = Some(ck.t),
            (false, Some(from)) => {
                bands.push((from, ck.t));
                since = None;
            }
            _ => {}
        }
    }
    if let Some(from) = since {
        bands.push((from, o.failover.kill_t));
    }
    let ys = chart.y_range();
    chart.draw_series(
        bands.into_iter().map(|(from, to)| Rectangle::new([(from, ys.start), (to, ys.end)], PASSIVE_MODE.filled())),
    )?;
    Ok(())
}

/// The phases' starts (dashed) and the kill (red), across a panel.
fn markers<Y: Ranged<ValueType = f64>>(chart: &TimeChart<'_, '_, Y>, o: &Outcome) -> Result<(), DrawError> {
    for ph in &o.phases {
        timeline::vline(chart, ph.start, PHASE.stroke_width(1), true)?;
    }
    timeline::vline(chart, o.failover.kill_t, timeline::ALARM.stroke_width(2), false)
}

/// Each checkpoint a bar from the bottom to its interval, blue (COLO) or orange (passive), and
/// a red dot over it when a miscompare triggered it.
fn checkpoints<Y: Ranged<ValueType = f64>>(
    chart: &mut TimeChart<'_, '_, Y>,
    o: &Outcome,
    span: f64,
) -> Result<(), DrawError> {
    let plot_w = f64::from(W - SIDES.0 - SIDES.1);
    // Bars as wide as a tenth of a second, but from 2 to 4 pixels.
    let half = (plot_w / span * 0.12).clamp(2.0, 4.0) / 2.0 * span / plot_w;
    let height = |ms: f64| ms.clamp(INTERVAL_MS.0, INTERVAL_MS.1);
    chart.draw_series(o.ckpts.iter().map(|ck| {
        let colour = if ck.passive { PASSIVE } else { COLO };
        Rectangle::new([(ck.t - half, INTERVAL_MS.0), (ck.t + half, height(ck.interval_ms))], colour.filled())
    }))?;
    chart.draw_series(o.ckpts.iter().filter(|ck| ck.miscompare()).map(|ck| {
        EmptyElement::at((ck.t, height(ck.interval_ms))) + Circle::new((0, -4), 3, timeline::ALARM.filled())
    }))?;
    Ok(())
}

/// What the kill was and how long the secondary took to take over, by the kill line (left of
/// it when it is near the right edge).
fn takeover<Y: Ranged<ValueType = f64>>(
    chart: &TimeChart<'_, '_, Y>,
    o: &Outcome,
    args: &Args,
) -> Result<(), DrawError> {
    let fo = &o.failover;
    let mut lines = vec![(if args.hosts == 1 { "primary SIGKILL" } else { "host a dies" }.to_string(), true)];
    if let Some(td) = fo.detected_t {
        lines.push((format!("the secondary took over after {:.0} ms", (td - fo.kill_t) * 1000.0), false));
        let reason = fo.secondary["last-failover"]["reason"].as_str().unwrap_or("");
        lines.push((reason.chars().take(100).collect(), false));
    }
    let style = |is_bold: bool| if is_bold { bold(12.0, timeline::ALARM) } else { text(12.0, timeline::ALARM) };
    let widest = lines
        .iter()
        .map(|(l, b)| chart.plotting_area().estimate_text_size(l, &style(*b)).map(|s| s.0))
        .try_fold(0, |m, w| w.map(|w| m.max(w)))?;
    let x = chart.backend_coord(&(fo.kill_t, INTERVAL_MS.1)).0;
    let (dx, h) = if timeline::runs_off(chart, x + 5, widest) { (-5, HPos::Right) } else { (5, HPos::Left) };
    for (i, (line, is_bold)) in lines.iter().enumerate() {
        let at = EmptyElement::at((fo.kill_t, INTERVAL_MS.1));
        let label = Text::new(line.clone(), (dx, 4 + 14 * i as i32), anchored(style(*is_bold), h, VPos::Top));
        chart.plotting_area().draw(&(at + label))?;
    }
    Ok(())
}

/// The longest silence of the counter around the failover, shaded, its length over it.
fn longest_gap<Y: Ranged<ValueType = f64>>(chart: &mut TimeChart<'_, '_, Y>, o: &Outcome) -> Result<(), DrawError> {
    let Some(ph) = o.phases.iter().find(|p| p.name == "top stopped") else { return Ok(()) };
    let Some(g) = failover_gap(&o.replies, &o.failover, ph) else { return Ok(()) };
    let ys = chart.y_range();
    let (from, to) = (g.from, g.from + g.secs);
    chart.draw_series([Rectangle::new([(from, ys.start), (to, ys.end)], timeline::ALARM.mix(0.3).filled())])?;
    let label = format!("longest gap {:.0} ms", g.secs * 1000.0);
    let style = text(12.0, timeline::ALARM);
    let w = chart.plotting_area().estimate_text_size(&label, &style)?.0;
    let x = chart.backend_coord(&(to, ys.end)).0;
    let (at, dx, h) = if timeline::runs_off(chart, x + 4, w) { (from, -4, HPos::Right) } else { (to, 4, HPos::Left) };
    chart
        .plotting_area()
        .draw(&(EmptyElement::at((at, ys.end)) + Text::new(label, (dx, -3), anchored(style, h, VPos::Bottom))))
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use serde_json::json;

    use super::*;
    use crate::{Ckpt, CpuTrack, FailoverResult, Phase};

    /// A run as the demo records one: periodic COLO checkpoints, then miscompares and passive
    /// ones, then COLO again, the kill at 30 s and a takeover 40 ms later.
    fn outcome() -> Outcome {
        let phase = |name, start, end| Phase { name, start, end };
        let phases = vec![
            phase("colo-start", 0.2, 0.7),
            phase("deterministic", 0.7, 8.7),
            phase("top", 8.7, 23.7),
            phase("top stopped", 23.7, 30.0),
            phase("failover", 30.0, 34.0),
        ];
        let ckpt = |seq: u64, t: f64, passive: bool, trigger: &str, interval_ms: f64| Ckpt {
            seq,
            t,
            passive,
            trigger: trigger.into(),
            interval_ms,
            pause_ms: 8.0,
            pages: 24,
        };
        let mut ckpts = vec![];
        for k in 0..4 {
            ckpts.push(ckpt(k, 2.7 + 2.0 * k as f64, false, "periodic", 2000.0));
        }
        for k in 0..5 {
            ckpts.push(ckpt(4 + k, 9.0 + 0.2 * k as f64, false, "miscompare:payload", 180.0));
        }
        for k in 0..20 {
            ckpts.push(ckpt(9 + k, 10.2 + 0.25 * k as f64, true, "passive", 250.0));
        }
        ckpts.push(ckpt(29, 28.0, false, "periodic", 2000.0));
        let share = (0..170).map(|k| k as f64 * 0.2).map(|t| (t, if (10.0..15.0).contains(&t) { 0.03 } else { 0.95 }));
        let cpu = CpuTrack { share: share.collect(), ..Default::default() };
        let replies: Vec<(f64, u64)> =
            (0..680).map(|k| k as f64 * 0.05).filter(|t| !(30.01..30.08).contains(t)).zip(1..).collect();
        Outcome {
            phases,
            colo_start_t: 0.2,
            end_t: 34.0,
            ckpts,
            primary: json!({
                "checkpoints": { "total": 30, "colo": 10, "passive": 20, "mode-switches": 2 },
                "pause-p50-ms": 8.0, "pause-p99-ms": 17.0,
            }),
            cpu,
            counter_first: 0,
            counter_last: replies.len() as u64,
            counter_incs: replies.len() as u64,
            replies,
            counter_error: None,
            top_lines: 70,
            top_error: None,
            failover: FailoverResult {
                kill_t: 30.0,
                detected_t: Some(30.04),
                secondary: json!({ "last-failover": { "reason": "checkpoint link broken" } }),
                compare_mode: "secondary-only".into(),
                fresh_get: Ok(680),
            },
            logs: String::new(),
        }
    }

    #[test]
    fn the_timeline_shows_every_checkpoint_phase_the_kill_the_gap_and_the_legend() {
        let args = Args::parse_from(["colo-demo"]);
        let svg = timeline(&outcome(), &args).expect("drawn");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
        for name in ["colo-start", "deterministic", "top", "top stopped", "failover"] {
            assert!(svg.contains(&format!("\n{name}\n")), "phase {name} is not named");
        }
        for text in [
            "30 checkpoints (10 COLO, 20 passive), 2 mode switches",
            "primary SIGKILL",
            "the secondary took over after 40 ms",
            "checkpoint link broken",
            "longest gap 100 ms",
            "interval before the checkpoint (log)",
            "10 ms",
            "10 s",
            "secondary CPU",
            "30 s",
            "counter",
            "COLO checkpoint",
            "passive mode",
            "triggered by a miscompare",
        ] {
            assert!(svg.contains(text), "{text:?} is not in the timeline");
        }
        // A bar per checkpoint in its mode's colour (and one swatch in the legend).
        let bars = |colour: RGBColor| colo_tests::timeline::fills(&svg, colour);
        assert_eq!(bars(COLO), 10 + 1);
        assert_eq!(bars(PASSIVE), 20 + 1);
        // A dot over each checkpoint a miscompare triggered (and one in the legend).
        assert_eq!(svg.matches("<circle").count(), 5 + 1);
    }
}
