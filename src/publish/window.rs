//! The publish window as a pure type: events sent and not yet settled, and
//! the stream positions behind them, in stream order. No I/O: the ack handle
//! is a type parameter, so its rules are unit-tested without NATS.
//!
//! Rules the publisher relies on:
//! - events settle only at the front, in the order they were sent (acks are
//!   awaited in order, so an event is never marked before one sent earlier);
//! - a position comes out only once every event before it has settled: it is
//!   safe to confirm once those events are marked;
//! - go-back-N walks every event still in the window, oldest first.
//!
//! What an event keeps until it settles (the stream's share of the byte
//! budget; nothing for the sweeper) is a type parameter too.

use crate::event::OutboxRow;
use pgwire_replication::Lsn;
use std::collections::VecDeque;

/// An event sent and not yet settled.
pub(crate) struct Sent<A, H = ()> {
    pub(crate) row: OutboxRow,
    /// Its transaction's commit time (µs since 2000-01-01), for latency.
    pub(crate) committed_at: i64,
    /// Its transaction, for the marker to tell "not visible yet" from "gone".
    pub(crate) xid: u32,
    /// Failed attempts so far, for its backoff.
    pub(crate) attempts: u32,
    /// What answers its publish (the JetStream ack future).
    pub(crate) ack: A,
    /// Kept until it settles, then dropped (its share of the byte budget).
    _held: H,
}

/// Nearly every slot is an event, so boxing it would only add an allocation
/// per event.
#[allow(clippy::large_enum_variant)]
enum Slot<A, H> {
    Event(Sent<A, H>),
    Confirm(Lsn),
}

pub(crate) struct Window<A, H = ()> {
    slots: VecDeque<Slot<A, H>>,
    /// Events among `slots`, kept so the count costs nothing per loop.
    events: usize,
}

impl<A, H> Window<A, H> {
    pub(crate) fn new() -> Self {
        Window {
            slots: VecDeque::new(),
            events: 0,
        }
    }

    /// Slots held, events and positions alike (the window's size).
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Events sent and not yet settled.
    pub(crate) fn in_flight(&self) -> usize {
        self.events
    }

    pub(crate) fn push_event(
        &mut self,
        row: OutboxRow,
        (committed_at, xid): (i64, u32),
        ack: A,
        held: H,
    ) {
        self.events += 1;
        self.slots.push_back(Slot::Event(Sent {
            row,
            committed_at,
            xid,
            attempts: 0,
            ack,
            _held: held,
        }));
    }

    /// Everything before `lsn` has been pushed.
    pub(crate) fn push_position(&mut self, lsn: Lsn) {
        self.slots.push_back(Slot::Confirm(lsn));
    }

    /// Removes the positions at the front (every event before them has
    /// settled) and returns the newest of them.
    pub(crate) fn take_settled_position(&mut self) -> Option<Lsn> {
        let mut newest = None;
        while let Some(Slot::Confirm(lsn)) = self.slots.front() {
            newest = Some(*lsn);
            self.slots.pop_front();
        }
        newest
    }

    /// The oldest event, if nothing but events stands before it.
    pub(crate) fn front_mut(&mut self) -> Option<&mut Sent<A, H>> {
        match self.slots.front_mut() {
            Some(Slot::Event(sent)) => Some(sent),
            _ => None,
        }
    }

    /// Removes the oldest event (acked, or a dead letter). `None` when the
    /// front is a position: take it first.
    pub(crate) fn settle_front(&mut self) -> Option<Sent<A, H>> {
        match self.slots.front() {
            Some(Slot::Event(_)) => {}
            _ => return None,
        }
        match self.slots.pop_front() {
            Some(Slot::Event(sent)) => {
                self.events -= 1;
                Some(sent)
            }
            _ => None,
        }
    }

    /// Every event in the window, oldest first (go-back-N sends them again).
    pub(crate) fn events_mut(&mut self) -> impl Iterator<Item = &mut Sent<A, H>> {
        self.slots.iter_mut().filter_map(|slot| match slot {
            Slot::Event(sent) => Some(sent),
            Slot::Confirm(_) => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use uuid::Uuid;

    fn row(n: u8) -> OutboxRow {
        OutboxRow {
            id: Uuid::from_bytes([n; 16]),
            aggregate_type: "chat".into(),
            aggregate_id: "a".into(),
            user_id: None,
            project_id: None,
            event_type: "x".into(),
            payload: Bytes::from_static(b"{}"),
            created_at: String::new(),
            headers: None,
        }
    }

    /// A window of events 1, 2 | position 10 | event 3 | position 20, 30.
    fn window() -> Window<&'static str> {
        let mut w = Window::new();
        w.push_event(row(1), (0, 0), "ack-1", ());
        w.push_event(row(2), (0, 0), "ack-2", ());
        w.push_position(Lsn(10));
        w.push_event(row(3), (0, 0), "ack-3", ());
        w.push_position(Lsn(20));
        w.push_position(Lsn(30));
        w
    }

    #[test]
    fn a_position_comes_out_only_after_every_event_before_it() {
        let mut w = window();
        assert_eq!((w.len(), w.in_flight()), (6, 3));
        assert_eq!(
            w.take_settled_position(),
            None,
            "events 1 and 2 are in flight"
        );
        assert_eq!(w.settle_front().map(|s| s.ack), Some("ack-1"));
        assert_eq!(w.take_settled_position(), None, "event 2 is in flight");
        assert_eq!(w.settle_front().map(|s| s.ack), Some("ack-2"));
        assert!(w.settle_front().is_none(), "a position stands in front");
        assert_eq!(w.take_settled_position(), Some(Lsn(10)));
        assert_eq!(w.settle_front().map(|s| s.ack), Some("ack-3"));
        assert_eq!(
            w.take_settled_position(),
            Some(Lsn(30)),
            "the newest of a run"
        );
        assert!(w.is_empty() && w.in_flight() == 0);
    }

    #[test]
    fn events_settle_in_the_order_they_were_sent() {
        let mut w = window();
        let mut settled = Vec::new();
        loop {
            w.take_settled_position();
            match w.settle_front() {
                Some(sent) => settled.push(sent.row.id),
                None => break,
            }
        }
        assert_eq!(settled, [row(1).id, row(2).id, row(3).id]);
    }

    #[test]
    fn go_back_n_walks_every_event_in_order_and_keeps_the_positions() {
        let mut w = window();
        w.front_mut().unwrap().attempts += 1;
        for sent in w.events_mut() {
            sent.ack = "resent";
        }
        let resent: Vec<_> = w
            .events_mut()
            .map(|s| (s.row.id, s.ack, s.attempts))
            .collect();
        assert_eq!(
            resent,
            [
                (row(1).id, "resent", 1),
                (row(2).id, "resent", 0),
                (row(3).id, "resent", 0)
            ]
        );
        assert_eq!(
            (w.len(), w.in_flight()),
            (6, 3),
            "positions stay where they were"
        );
    }

    #[test]
    fn a_dead_letter_leaves_the_window_and_the_rest_stand() {
        let mut w = window();
        let dead = w.settle_front().unwrap();
        assert_eq!(dead.row.id, row(1).id);
        assert_eq!(w.front_mut().map(|s| s.row.id), Some(row(2).id));
        assert_eq!(w.in_flight(), 2);
    }
}
