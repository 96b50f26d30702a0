use proptest::prelude::*;

use super::*;

const SECOND: Duration = Duration::from_secs(1);

/// A budget that left slow start at `rate` well over a settling time ago: a 429 now is a
/// new congestion event.
fn avoiding(rate: f64, now: Instant) -> Aimd {
    let mut aimd = Aimd::new(rate, 1000.0, 5.0, now);
    let event = Event {
        at: now - 2 * SETTLE,
        rate,
        throttled_at: rate / PLATEAU,
    };
    aimd.follow(event, now);
    aimd
}

fn assert_near(actual: f64, expected: f64) {
    assert!(
        (actual - expected).abs() < 0.1,
        "{actual} is not {expected}"
    );
}

/// Feeds `aimd` one waited success every `1/share` for `secs` seconds.
fn run(aimd: &mut Aimd, now: &mut Instant, secs: f64) {
    let end = *now + Duration::from_secs_f64(secs);
    while *now < end {
        *now += Duration::from_secs_f64(1.0 / aimd.share(*now));
        aimd.sent(*now);
        aimd.succeeded(*now);
    }
}

#[test]
fn slow_start_grows_eightfold_each_second_up_to_the_ceiling() {
    let mut now = Instant::now();
    let mut aimd = Aimd::new(5.0, 60.0, 5.0, now);
    // Growth starts once a few calls show the budget in use, then is ×8 each second.
    run(&mut aimd, &mut now, 1.0);
    let after_one = aimd.rate(now);
    assert!((10.0..=22.0).contains(&after_one), "{after_one}");
    run(&mut aimd, &mut now, 0.5);
    let grew = aimd.rate(now) / after_one;
    assert!((2.4..=3.2).contains(&grew), "{grew}");
    run(&mut aimd, &mut now, 5.0);
    assert_eq!(aimd.rate(now), 60.0, "never above the configured ceiling");
}

#[test]
fn leaving_slow_start_falls_back_to_the_rate_it_sent_at() {
    let mut now = Instant::now();
    let mut aimd = Aimd::new(5.0, 1000.0, 5.0, now);
    run(&mut aimd, &mut now, 2.0);
    let sent = aimd.sent.count_rate_before(now);
    assert!(aimd.rate(now) > 1.5 * sent, "{} vs {sent}", aimd.rate(now));
    assert!(aimd.throttled(now, now));
    assert_eq!(aimd.rate(now), sent * DECREASE);
}

#[test]
fn a_429_speaks_for_the_rate_sent_not_the_budget_unreached() {
    let mut now = Instant::now();
    let mut aimd = avoiding(50.0, now);
    // Short of CPU, the replica sends 49.5/s of its 50/s budget.
    let gap = Duration::from_micros(20_202);
    for _ in 0..60 {
        now += gap;
        aimd.sent(now);
    }
    now += gap;
    assert!(aimd.throttled(now, now));
    let sent = 1.0 / gap.as_secs_f64();
    assert!((aimd.rate(now) - sent * DECREASE).abs() < 1e-6);
    // A measure far under the budget (a hold in the last second) takes it no lower than
    // the plateau.
    let mut aimd = avoiding(50.0, now);
    aimd.sent(now - SECOND / 2);
    aimd.sent(now);
    now += SECOND / 2;
    let plateau = aimd.rate(now) * PLATEAU;
    assert!(aimd.throttled(now, now));
    assert_eq!(aimd.rate(now), plateau * DECREASE);
}

#[test]
fn growth_in_time_is_taken_only_as_calls_take_it() {
    let mut now = Instant::now();
    let mut aimd = avoiding(50.0, now);
    assert!(aimd.throttled(now, now));
    let limit = aimd.learned().unwrap().throttled_at;
    now += 30 * SECOND;
    // Recovered to the plateau within the grace, and no further.
    assert_near(aimd.rate(now), PLATEAU * limit);
    assert_eq!(aimd.curve(now), None, "off the shared curve while idle");
    run(&mut aimd, &mut now, 1.0);
    assert!(aimd.curve(now).is_some(), "back on it once in use");
    assert!(aimd.rate(now) > PLATEAU * 50.0);
}

#[test]
fn a_429_on_the_first_call_does_not_floor_the_budget() {
    let now = Instant::now();
    let mut aimd = Aimd::new(5.0, 5.0, 5.0, now);
    aimd.throttled(now, now);
    assert_eq!(
        aimd.rate(now),
        5.0 * DECREASE,
        "nothing sent to measure: the budget itself"
    );
}

#[test]
fn an_idle_worker_learns_nothing() {
    let mut now = Instant::now();
    let mut aimd = Aimd::new(5.0, 100.0, 5.0, now);
    for _ in 0..10 {
        now += SECOND;
        aimd.succeeded(now);
    }
    assert_eq!(
        aimd.rate(now),
        5.0,
        "one call a second does not test a budget of five"
    );
}

#[test]
fn one_decrease_per_congestion_event() {
    let now = Instant::now();
    let mut aimd = avoiding(50.0, now);
    let sent = now;
    let later = now + Duration::from_millis(5);
    assert!(aimd.throttled(sent, later));
    assert_near(aimd.rate(later), 45.0);
    // Calls already in flight when the first 429 came back are the same event, and so are
    // calls sent before the decrease can show in the tenant's window.
    assert!(!aimd.throttled(sent, later + Duration::from_millis(1)));
    let soon = later + Duration::from_millis(2);
    assert!(!aimd.throttled(soon, soon));
    assert_near(aimd.rate(soon), 45.0);
    // A call sent well after the decrease and still throttled is a new event.
    let t = later + SETTLE + Duration::from_millis(1);
    let before = aimd.rate(t);
    assert!(aimd.throttled(t, t));
    assert_eq!(aimd.rate(t), before * DECREASE);
}

#[test]
fn recovers_fast_to_the_plateau_then_probes_slowly() {
    let mut now = Instant::now();
    let mut aimd = avoiding(50.0, now);
    let before = aimd.rate(now);
    aimd.throttled(now, now);
    run(&mut aimd, &mut now, 1.0);
    assert_near(aimd.rate(now), before * PLATEAU);
    run(&mut aimd, &mut now, 4.0);
    assert!(aimd.rate(now) < before, "slow beyond the plateau");
}

/// Three replicas against one shared limit, each seeing the 429s of its own calls and told
/// nothing by the others (the degraded mode): the aggregate settles near the limit and no
/// replica starves. Probing is slow, so sharing out evenly takes minutes, not seconds.
#[test]
fn replicas_converge_on_sharing_the_limit() {
    const LIMIT: f64 = 50.0;
    let start = Instant::now();
    let mut replicas: Vec<Aimd> = [5.0, 5.0, 30.0]
        .map(|r| Aimd::new(r, 1000.0, 5.0, start))
        .into();
    let step = Duration::from_millis(10);
    let mut now = start;
    let (mut sum_total, mut samples) = (0.0, 0);
    for tick in 0..30_000 {
        now += step;
        let total: f64 = replicas.iter().map(|r| r.rate(now)).sum();
        // The limit applies once the tenant's window has filled.
        let over = tick >= 100 && total > LIMIT;
        for r in &mut replicas {
            // Each call over the limit is a 429 for whoever sent it; all calls wait for slots.
            r.sent(now);
            if over {
                r.throttled(now - step, now);
            } else {
                r.succeeded(now);
            }
        }
        if tick >= 15_000 {
            sum_total += replicas.iter().map(|r| r.rate(now)).sum::<f64>();
            samples += 1;
        }
    }
    let mean = sum_total / samples as f64;
    assert!(
        mean > 0.9 * LIMIT && mean <= 1.02 * LIMIT,
        "aggregate {mean}"
    );
    for r in &replicas {
        let rate = r.rate(now);
        assert!(rate > 0.15 * LIMIT, "a replica starved: {rate}");
    }
}

/// Three replicas that tell each other: each sends a third of the shared budget, so the
/// budget's use is judged on the share and it grows as one worker's would.
#[test]
fn a_replica_grows_the_shared_budget_on_its_share() {
    let mut now = Instant::now();
    let mut aimd = avoiding(30.0, now);
    aimd.set_replicas(3);
    assert_near(aimd.share(now), 10.0);
    let before = aimd.rate(now);
    run(&mut aimd, &mut now, 2.0);
    assert!(
        aimd.rate(now) > before,
        "its share in use: {}",
        aimd.rate(now)
    );
    aimd.set_replicas(0);
    assert_eq!(aimd.share(now), aimd.rate(now), "never fewer than itself");
}

fn event(at: Instant, rate: f64, throttled_at: f64) -> Event {
    Event {
        at,
        rate,
        throttled_at,
    }
}

#[test]
fn replicas_throttled_together_merge_one_event() {
    let now = Instant::now();
    let mut aimd = avoiding(50.0, now);
    aimd.throttled(now, now);
    let own = aimd.learned().unwrap();
    let peer = event(now - Duration::from_millis(3), 44.0, 51.0);
    aimd.peer_learned(peer, now);
    assert_eq!(
        aimd.learned(),
        Some(event(
            peer.at,
            own.rate.min(44.0),
            own.throttled_at.max(51.0)
        )),
        "the earliest time, the lowest budget, the highest measure"
    );
    // Its own 429s from the same overload are that event.
    assert!(!aimd.throttled(now, now + Duration::from_millis(5)));
    // An older event changes nothing; a later one replaces it.
    let merged = aimd.learned();
    aimd.peer_learned(event(now - 5 * SETTLE, 10.0, 11.0), now);
    assert_eq!(aimd.learned(), merged);
    let later = now + 2 * SETTLE;
    aimd.peer_learned(event(later, 40.0, 42.0), later);
    assert_eq!(aimd.learned(), Some(event(later, 40.0, 42.0)));
}

#[test]
fn a_peer_event_is_bounded() {
    let now = Instant::now();
    let mut aimd = avoiding(50.0, now);
    let later = now + 2 * SETTLE;
    aimd.peer_learned(event(later + 1000 * SECOND, f64::NAN, f64::INFINITY), later);
    let learned = aimd.learned().unwrap();
    assert_eq!(learned.at, later, "no later than now");
    assert!(learned.rate.is_finite() && learned.throttled_at.is_finite());
    let much_later = later + 2 * SETTLE;
    aimd.peer_learned(event(much_later, -1.0, 0.0), much_later);
    assert_eq!(aimd.rate(much_later), FLOOR, "bounded below");
}

#[test]
fn a_starting_budget_takes_a_peer_event_as_the_tenants_budget() {
    let now = Instant::now();
    let mut fresh = Aimd::new(5.0, 1000.0, 5.0, now);
    assert_eq!(fresh.learned(), None);
    let peer = event(now - 10 * SECOND, 45.0, 50.0);
    fresh.peer_learned(peer, now);
    assert_eq!(
        fresh.learned(),
        Some(peer),
        "not its own 5/s, which is no knowledge"
    );
    // Recovered 0.85 s after it, then probing at 0.025/s a second.
    assert_near(fresh.rate(now), 50.0 * PLATEAU + 0.025 * 9.15);
}

proptest! {
    /// Replicas hear one event's reports in any order and end on the same budget.
    #[test]
    fn merging_is_independent_of_order(
        reports in proptest::collection::vec((0u64..900, 1.0f64..100.0, 1.0f64..100.0), 1..6),
        seed in any::<u64>(),
    ) {
        let now = Instant::now() + 10 * SECOND;
        let events: Vec<Event> = reports
            .iter()
            .map(|(ms, rate, at)| event(now - Duration::from_millis(*ms), *rate, *at))
            .collect();
        let mut shuffled = events.clone();
        let len = shuffled.len();
        shuffled.rotate_left((seed % len as u64) as usize);
        if seed & 1 == 1 {
            shuffled.reverse();
        }
        let merged = |events: &[Event]| {
            let mut aimd = Aimd::new(5.0, 1000.0, 5.0, now);
            for e in events {
                aimd.peer_learned(*e, now);
            }
            (aimd.learned(), aimd.rate(now))
        };
        prop_assert_eq!(merged(&events), merged(&shuffled));
    }
}

#[test]
fn an_event_long_past_is_no_licence_to_call_faster_than_it_was_sent() {
    let now = Instant::now() + 2 * MAX_EVENT_AGE;
    let mut fresh = Aimd::new(5.0, 1000.0, 5.0, now);
    // An hour of probing since would put the budget near 140/s; the tenant was sent at 50.
    fresh.peer_learned(event(now - MAX_EVENT_AGE, 45.0, 50.0), now);
    assert_near(fresh.rate(now), 50.0 * (1.0 + HEADROOM));
    // Older still (or forged): taken as an hour old.
    let mut fresh = Aimd::new(5.0, 1000.0, 5.0, now);
    fresh.peer_learned(event(now - 2 * MAX_EVENT_AGE, 45.0, 50.0), now);
    assert_eq!(fresh.learned().unwrap().at, now - MAX_EVENT_AGE);
}

#[test]
fn a_starting_replica_merges_what_its_own_calls_measure() {
    let mut now = Instant::now();
    let mut fast = Aimd::new(5.0, 1000.0, 5.0, now);
    run(&mut fast, &mut now, 1.5);
    let sent = fast.sent.count_rate_before(now);
    assert!(sent > 10.0, "{sent}");
    // A replica that had just started was answered 429 for its own few calls a second.
    fast.peer_learned(event(now, 3.6, 4.0), now);
    let learned = fast.learned().unwrap();
    assert_eq!(
        learned.throttled_at, sent,
        "the tenant was sent at least this"
    );
    assert_eq!(learned.rate, 3.6, "the lowest budget");
}
