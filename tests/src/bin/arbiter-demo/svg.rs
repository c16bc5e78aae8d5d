//! The timeline as an SVG, drawn with plotters: one lane per host showing where it stood over
//! time (as the watch saw it), under each lane the frames the host sent from the VM's MAC (its
//! switch port), then the counter's replies with the gap of each failover; the phases, the
//! deaths and the partition marked across, a legend under it.
//!
//! What each lane segment and each event line stood for was once a hover title; plotters
//! writes no `<title>` elements, and the demo's text timeline (stdout) and JSON summary
//! (`--json`) list every change and event.

use colo_tests::status_watch::Look;
use colo_tests::timeline::{self, anchored, bold, rgb, text, Area, DrawError, Key, TimeChart};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};

use crate::outcome::{failover_gap, Outcome, HOSTS};

/// Where a host stood, for its lane's colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stand {
    PrimaryColo,
    SecondaryColo,
    Starting,
    Waiting,
    Alone,
    Fenced,
    Stopped,
    NoApi,
    Down,
}

impl Stand {
    fn of(look: &Option<Look>, dead: bool) -> Stand {
        let Some(l) = look else { return if dead { Stand::Down } else { Stand::NoApi } };
        if l.fenced.is_some() {
            return Stand::Fenced;
        }
        match (l.role.as_str(), l.state.as_str()) {
            (_, "failed-over") | ("none", _) => Stand::Alone,
            (_, "starting") => Stand::Starting,
            ("secondary", _) if l.waiting.is_some() => Stand::Waiting,
            ("primary", "running") => Stand::PrimaryColo,
            ("secondary", "running") => Stand::SecondaryColo,
            _ => Stand::Stopped,
        }
    }

    const ALL: [Stand; 9] = [
        Stand::PrimaryColo,
        Stand::SecondaryColo,
        Stand::Starting,
        Stand::Waiting,
        Stand::Alone,
        Stand::Fenced,
        Stand::Stopped,
        Stand::NoApi,
        Stand::Down,
    ];

    fn colour(self) -> RGBColor {
        match self {
            Stand::PrimaryColo => rgb(0x3274a1),
            Stand::SecondaryColo => rgb(0x9ecae1),
            Stand::Starting => rgb(0xb5cf6b),
            Stand::Waiting => rgb(0xf2cf5b),
            Stand::Alone => rgb(0xe1812c),
            Stand::Fenced => rgb(0xd62728),
            Stand::Stopped => rgb(0xc7c7c7),
            Stand::NoApi => rgb(0xf2f2f2),
            Stand::Down => rgb(0x555555),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Stand::PrimaryColo => "primary in COLO",
            Stand::SecondaryColo => "secondary in COLO",
            Stand::Starting => "starting COLO",
            Stand::Waiting => "waiting for the key",
            Stand::Alone => "serving alone",
            Stand::Fenced => "fenced",
            Stand::Stopped => "stopped",
            Stand::NoApi => "standby / no API",
            Stand::Down => "host down",
        }
    }
}

const W: u32 = 1200;
const H: u32 = 470;
/// The label area left of the chart and the margin right of it.
const SIDES: (u32, u32) = (120, 30);
/// Where the header ends, where the legend begins.
const BREAKS: [u32; 2] = [104, 360];

/// The chart's y counts rows top down: host a's lane is centred on 1, b's on 2, c's on 3, the
/// counter on 4, so the whole numbers the mesh labels name them. A row is about 62 pixels;
/// these are in rows, from a row's centre.
const LANE_HALF: f64 = 0.24;
/// The strip under a lane with the frames its host sent as the VM.
const STRIP: (f64, f64) = (0.28, 0.43);
const COUNTER_ROW: f64 = 4.0;
const COUNTER_HALF: f64 = 0.23;
/// From just above host a's lane to just below the counter.
const ROWS: std::ops::Range<f64> = 4.33..0.66;

const PHASE: RGBColor = rgb(0x777777);
const PARTITION: RGBColor = rgb(0x9467bd);
const NOTE: RGBColor = rgb(0x666666);

fn lane(i: usize) -> f64 {
    i as f64 + 1.0
}

/// The SVG.
pub fn timeline(o: &Outcome) -> Result<String, DrawError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        draw(&root, o)?;
        root.present()?;
    }
    Ok(svg)
}

fn draw(root: &Area, o: &Outcome) -> Result<(), DrawError> {
    root.fill(&WHITE)?;
    let areas = root.split_by_breakpoints([] as [u32; 0], BREAKS);
    let [head, body, foot] = &areas[..] else { unreachable!("two breaks make three areas") };
    let left = SIDES.0 as i32;

    let gaps: Vec<String> = o
        .failovers
        .iter()
        .map(|f| {
            let took = f.took_over_t.map(|t| format!("{:.0} ms", (t - f.kill_t) * 1000.0)).unwrap_or("-".into());
            let gap = failover_gap(&o.replies, f).map(|g| format!("{:.0} ms", g.0 * 1000.0)).unwrap_or("-".into());
            format!("{}→{}: took over after {took}, client gap {gap}", HOSTS[f.dead], HOSTS[f.survivor])
        })
        .collect();
    let counter = format!(
        "counter {} → {}, {} increments on one connection; {}",
        o.counter_first,
        o.counter_last,
        o.replies.len(),
        if o.passed() { "every check passed" } else { "SOME CHECKS FAILED" }
    );
    timeline::header(
        head,
        left,
        "COLO across three hosts with an etcd arbiter: who served, over time",
        &[gaps.join("; "), counter],
    )?;

    let time = o.colo_t - 1.0..o.end_t + 0.5;
    let mut chart = timeline::time_chart(body, time.clone(), ROWS, SIDES, (0, 0), true)?;
    partition(&mut chart, o)?;
    for i in 0..HOSTS.len() {
        host_lane(&mut chart, o, i)?;
    }
    counter_row(&mut chart, o)?;
    timeline::mesh(&mut chart, None)
        .y_labels(5)
        .y_label_formatter(&row_name)
        .y_label_style(bold(12.0, BLACK))
        .draw()?;
    markers(&chart, o)?;
    let names = o.phases.iter().map(|p| (p.start, p.name.to_string()));
    timeline::labels_at(head, &chart, names, BREAKS[0] as i32 - 20, rgb(0x222222))?;
    let deaths = o.failovers.iter().map(|f| (f.kill_t, format!("host {} dies", HOSTS[f.dead])));
    timeline::labels_at(head, &chart, deaths, BREAKS[0] as i32 - 4, timeline::ALARM)?;

    let mut entries: Vec<(Key, &str)> =
        Stand::ALL.iter().map(|s| (Key::Swatch(s.colour().to_rgba()), s.label())).collect();
    entries.extend([
        (
            Key::Tick(timeline::TRAFFIC.to_rgba()),
            "a frame from the VM's MAC on the host's switch port, a counter reply",
        ),
        (Key::Tick(timeline::ALARM.to_rgba()), "RARP: the survivor announces the VM"),
        (Key::Dashed(PHASE.to_rgba()), "a phase begins"),
        (Key::Tick(BLACK.mix(0.2)), "an event of the text timeline"),
    ]);
    let below = timeline::legend(foot, &entries, left, (W - SIDES.1) as i32, 14)?;
    foot.draw(&Text::new(
        "lanes: each host's query-colo-status, polled every 100 ms; time in seconds since the demo started",
        (left, below),
        text(12.0, NOTE),
    ))?;
    Ok(())
}

/// The mesh's label for row `y`: a host's lane or the counter.
fn row_name(y: &f64) -> String {
    let row = y.round();
    if (y - row).abs() > 0.01 {
        return String::new();
    }
    match row as usize {
        r @ 1..=3 => format!("host {}", HOSTS[r - 1]),
        4 => "counter".into(),
        _ => String::new(),
    }
}

/// The partition: a band across hosts b and c while it held.
fn partition(chart: &mut TimeChart<'_, '_, RangedCoordf64>, o: &Outcome) -> Result<(), DrawError> {
    let Some((cut, heal)) = o.partition else { return Ok(()) };
    let (top, bottom) = (lane(1) - LANE_HALF - 0.08, lane(2) + 0.55);
    chart.draw_series([Rectangle::new([(cut, top), (heal, bottom)], PARTITION.mix(0.15).filled())])?;
    let label = Text::new("b–c partition", (3, -2), text(11.0, rgb(0x6a3d9a)));
    chart.plotting_area().draw(&(EmptyElement::at((cut, top)) + label))
}

/// Host `i`'s lane, coloured by where it stood from each change to the next (dark from its
/// death), framed; under it the frames it sent from the VM's MAC, the announcements (RARP)
/// taller and red.
fn host_lane(chart: &mut TimeChart<'_, '_, RangedCoordf64>, o: &Outcome, i: usize) -> Result<(), DrawError> {
    let (top, bottom) = (lane(i) - LANE_HALF, lane(i) + LANE_HALF);
    let dead = o.killed_at(i);
    let changes: Vec<_> = o.changes.iter().filter(|c| c.host == i).collect();
    let mut segments = vec![];
    for (k, c) in changes.iter().enumerate() {
        let mut end = changes.get(k + 1).map(|n| n.t).unwrap_or(o.end_t);
        if let Some(d) = dead.filter(|d| c.t < *d) {
            end = end.min(d);
        }
        segments.push((c.t, end, Stand::of(&c.look, dead.is_some_and(|d| c.t >= d))));
    }
    if let Some(d) = dead {
        segments.push((d, o.end_t, Stand::Down));
    }
    chart.draw_series(
        segments
            .into_iter()
            .filter(|(a, b, _)| b > a)
            .map(|(a, b, stand)| Rectangle::new([(a, top), (b, bottom)], stand.colour().filled())),
    )?;
    let (x0, x1) = (chart.x_range().start, chart.x_range().end);
    chart.draw_series([Rectangle::new([(x0, top), (x1, bottom)], timeline::FRAME)])?;
    timeline::label_left(chart, lane(i) + (STRIP.0 + STRIP.1) / 2.0, "frames as the VM", text(10.0, NOTE))?;
    let frames = o.frames.get(i).map(Vec::as_slice).unwrap_or(&[]);
    let strip = lane(i) + STRIP.0..lane(i) + STRIP.1;
    let sent = frames.iter().filter(|f| !f.rarp).map(|f| f.t);
    timeline::ticks(chart, sent, strip, timeline::TRAFFIC.stroke_width(1))?;
    let rarps = frames.iter().filter(|f| f.rarp).map(|f| f.t);
    timeline::ticks(chart, rarps, bottom..lane(i) + STRIP.1 + 0.03, timeline::ALARM.stroke_width(2))
}

/// The counter's replies, and the gap of each failover shaded with its length in it (or after
/// it, when it is too narrow).
fn counter_row(chart: &mut TimeChart<'_, '_, RangedCoordf64>, o: &Outcome) -> Result<(), DrawError> {
    let (top, bottom) = (COUNTER_ROW - COUNTER_HALF, COUNTER_ROW + COUNTER_HALF);
    timeline::ticks(chart, o.replies.iter().copied(), top + 0.06..bottom - 0.06, timeline::TRAFFIC.stroke_width(1))?;
    let style = text(11.0, timeline::ALARM);
    for f in &o.failovers {
        let Some((gap, from)) = failover_gap(&o.replies, f) else { continue };
        chart.draw_series([Rectangle::new([(from, top), (from + gap, bottom)], timeline::ALARM.mix(0.3).filled())])?;
        let label = format!("gap {:.0} ms", gap * 1000.0);
        let w = chart.plotting_area().estimate_text_size(&label, &style)?.0 as i32;
        let (a, b) = (chart.backend_coord(&(from, top)).0, chart.backend_coord(&(from + gap, top)).0);
        let at = if b - a >= w + 6 { from } else { from + gap };
        let label = Text::new(label, (3, 0), anchored(style.clone(), HPos::Left, VPos::Center));
        chart.plotting_area().draw(&(EmptyElement::at((at, COUNTER_ROW)) + label))?;
    }
    let (x0, x1) = (chart.x_range().start, chart.x_range().end);
    chart.draw_series([Rectangle::new([(x0, top), (x1, bottom)], timeline::FRAME)])?;
    Ok(())
}

/// The phases' starts (dashed), the deaths (red) and the demo's events (faint) across the
/// chart.
fn markers(chart: &TimeChart<'_, '_, RangedCoordf64>, o: &Outcome) -> Result<(), DrawError> {
    for e in &o.events {
        timeline::vline_between(
            chart,
            e.t,
            lane(0) - LANE_HALF..COUNTER_ROW + COUNTER_HALF,
            BLACK.mix(0.2).into(),
            false,
        )?;
    }
    for p in &o.phases {
        timeline::vline(chart, p.start, PHASE.stroke_width(1), true)?;
    }
    for f in &o.failovers {
        timeline::vline(chart, f.kill_t, timeline::ALARM.stroke_width(2), false)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::outcome::{Change, Check, Event, Failover, Phase, VmFrame};

    /// A run as the demo records one: COLO a→b, a dies at 5 s, b serves and protects itself
    /// with c, a b–c partition, b dies at 19 s, c serves.
    fn outcome() -> Outcome {
        let phase = |name, start, end| Phase {
            name,
            title: String::new(),
            start,
            end,
            checks: vec![Check { what: "it held".into(), pass: true, detail: String::new() }],
        };
        let look = |role: &str, state: &str| Some(Look::of(&json!({ "role": role, "state": state })));
        let change = |t, host, look| Change { t, host, look, inferred: false };
        let frames = |from: f64, to: f64, rarp: bool| {
            let mut f: Vec<VmFrame> = (0..((to - from) * 20.0) as usize)
                .map(|k| VmFrame { t: from + k as f64 * 0.05, rarp: false })
                .collect();
            if rarp {
                f.splice(0..0, (0..5).map(|k| VmFrame { t: from - 0.5 + 0.1 * k as f64, rarp: true }));
            }
            f
        };
        let failover = |dead, survivor, kill_t: f64| Failover {
            dead,
            survivor,
            kill_t,
            took_over_t: Some(kill_t + 2.0),
            reason: "no heartbeat from the primary for 1000 ms".into(),
            protected_t: None,
        };
        let replies: Vec<f64> = (0..2400)
            .map(|k| 1.5 + k as f64 * 0.01)
            .filter(|t| !(5.05..8.1).contains(t) && !(19.05..22.1).contains(t))
            .collect();
        Outcome {
            phases: vec![
                phase("colo", 1.2, 5.0),
                phase("a dies", 5.0, 10.8),
                phase("partition", 10.8, 19.0),
                phase("b dies", 19.0, 25.6),
                phase("counter", 25.6, 25.7),
            ],
            events: vec![Event { t: 10.8, host: None, what: "the b–c link cut".into() }],
            changes: vec![
                change(1.2, 0, look("primary", "running")),
                change(1.2, 1, look("secondary", "running")),
                change(1.2, 2, None),
                change(7.0, 1, look("primary", "failed-over")),
                change(8.0, 2, look("secondary", "running")),
                change(10.8, 2, None),
                change(16.0, 2, look("secondary", "running")),
                change(21.0, 2, look("secondary", "failed-over")),
            ],
            failovers: vec![failover(0, 1, 5.0), failover(1, 2, 19.0)],
            partition: Some((10.8, 14.9)),
            counter_first: 0,
            counter_last: replies.len() as u64,
            replies,
            frames: vec![frames(1.5, 5.0, false), frames(7.5, 19.0, true), frames(21.5, 25.5, true)],
            colo_t: 1.2,
            end_t: 25.6,
            logs: String::new(),
        }
    }

    #[test]
    fn the_timeline_shows_every_lane_phase_death_gap_and_the_legend() {
        let o = outcome();
        let svg = timeline(&o).expect("drawn");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
        for text in [
            "a→b: took over after 2000 ms, client gap 3060 ms",
            format!("counter 0 → {}, {} increments", o.replies.len(), o.replies.len()).as_str(),
            "every check passed",
            "host a",
            "host b",
            "host c",
            "frames as the VM",
            "colo",
            "partition",
            "b dies",
            "host a dies",
            "host b dies",
            "b–c partition",
            "gap 3060 ms",
            "10 s",
            "RARP: the survivor announces the VM",
        ] {
            assert!(svg.contains(text), "{text:?} is not in the timeline");
        }
        // Each stand in its colour: in a lane and in the legend, or only in the legend.
        let fills = |s: Stand| colo_tests::timeline::fills(&svg, s.colour());
        assert_eq!(fills(Stand::PrimaryColo), 1 + 1);
        assert_eq!(fills(Stand::Alone), 2 + 1);
        assert_eq!(fills(Stand::Down), 2 + 1);
        assert_eq!(fills(Stand::Waiting), 1);
    }
}
