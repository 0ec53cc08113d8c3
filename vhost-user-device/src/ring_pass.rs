//! One pass of a device over a ring the guest fills: take chains with the guest's kicks
//! off, at most a budget of them, and turn kicks back on only once the ring is found
//! empty.
//!
//! Every consumer of a driver-to-device ring (blk requests, net transmit and control,
//! console output and control) needs the same loop, and each way of getting it slightly
//! wrong costs something: kicks left on while draining make the guest exit for every
//! chain; kicks turned on without looking at the ring once more lose a chain published
//! in between (the guest saw kicks off and did not kick); no budget lets a guest that
//! refills as fast as we take keep the worker from its other rings and commands. The
//! device keeps its own reasons to stop (a full engine, a throttle, a host side that
//! blocks) and simply stops calling [`RingPass::pop`]: kicks then stay off and it comes
//! back on its own event.
//!
//! ```text
//! let mut pass = RingPass::new(BUDGET);
//! while pass.pop(ring, &mem, &mut self.chain) {
//!     // serve self.chain, add it to the used ring
//! }
//! if pass.end() == PassEnd::Budget {
//!     // kicks are off: come back through the worker's own "more" event
//! }
//! ```

use crate::chain::Chain;
use crate::memory::GuestMem;
use crate::ring::Ring;

/// Times one [`RingPass::pop`] looks again after turning kicks on found chains that `pop`
/// then did not (a guest moving its avail index back and forth while we look). Past it
/// the pass ends as if its budget were spent: kicks off, the device comes back on its own.
const RECHECKS: usize = 8;

/// Why a pass stopped taking chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassEnd {
    /// The device stopped calling [`RingPass::pop`] while chains may be left (or has not
    /// finished): kicks stay off, the device comes back on its own event.
    Open,
    /// The ring was empty and kicks are on again (or the ring cannot be read any more:
    /// [`Ring::is_broken`]; nothing will come from it).
    Empty,
    /// The budget is used up: kicks stay off and the device must come back on its own
    /// (chains are likely left).
    Budget,
    /// The ring's round was spent on malformed chains ([`Ring::round_spent`]): chains may
    /// be left, kicks stay off, and the layer's worker comes back without a kick.
    RoundSpent,
}

/// A budgeted pass over one ring: see the module documentation.
#[derive(Debug)]
pub struct RingPass {
    budget: usize,
    taken: usize,
    kicks_off: bool,
    end: PassEnd,
}

impl RingPass {
    /// A pass that takes at most `budget` chains.
    pub fn new(budget: usize) -> Self {
        RingPass {
            budget,
            taken: 0,
            kicks_off: false,
            end: PassEnd::Open,
        }
    }

    /// Takes the next chain into `chain`, with kicks off. False when the pass should
    /// stop ([`RingPass::end`] says why): the budget is spent (kicks stay off; also when
    /// the avail index kept moving back and forth under it, see `RECHECKS`), the ring
    /// is empty (kicks are on again, after a last look that found nothing published
    /// meanwhile), or the ring's round is spent. Calling it again after an empty ring
    /// looks once more, within the same budget.
    pub fn pop(&mut self, ring: &mut Ring, mem: &GuestMem, chain: &mut Chain) -> bool {
        if !self.kicks_off {
            ring.disable_notification(mem);
            self.kicks_off = true;
        }
        if self.taken >= self.budget {
            self.end = PassEnd::Budget;
            return false;
        }
        for _ in 0..=RECHECKS {
            if ring.pop(mem, chain) {
                self.taken += 1;
                self.end = PassEnd::Open;
                return true;
            }
            if ring.round_spent() {
                // Kicks stay off: the worker comes back for the rest.
                self.end = PassEnd::RoundSpent;
                return false;
            }
            if !ring.enable_notification(mem) {
                self.kicks_off = false;
                self.end = PassEnd::Empty;
                return false;
            }
            // Chains came while kicks were going back on: take them with kicks off. A
            // driver that publishes them takes them on the next turn (or spends the
            // round, or breaks the ring); only one that moves its avail index back and
            // forth under us makes `enable_notification` see chains `pop` then does not,
            // and that is what the bound is for.
            ring.disable_notification(mem);
        }
        self.end = PassEnd::Budget;
        false
    }

    /// Ends the pass before the ring is empty, with kicks off (the device comes back on
    /// its own event: completions that make room, a timer), even if the last
    /// [`RingPass::pop`] found the ring empty and turned them on.
    pub fn hold(&mut self, ring: &mut Ring, mem: &GuestMem) {
        if !self.kicks_off {
            ring.disable_notification(mem);
            self.kicks_off = true;
        }
        self.end = PassEnd::Open;
    }

    /// Chains taken so far.
    pub fn taken(&self) -> usize {
        self.taken
    }

    /// Why the pass stopped ([`PassEnd::Open`] while it has not).
    pub fn end(&self) -> PassEnd {
        self.end
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::tests::{desc, publish, ring_of, used_idx, USED};
    use vm_memory::{Bytes, GuestAddress};

    /// VRING_USED_F_NO_NOTIFY in the used ring's flags: the guest need not kick.
    fn kicks_off(mem: &GuestMem) -> bool {
        let flags: u16 = mem.read_obj(GuestAddress(USED)).unwrap();
        u16::from_le(flags) & 1 == 1
    }

    /// `n` good one-buffer chains, heads 0..n.
    fn good_chains(mem: &GuestMem, n: u16) {
        for i in 0..n {
            desc(mem, i, 0x8000 + 0x100 * u64::from(i), 16);
        }
        publish(mem, n);
    }

    fn heads_of_pass(ring: &mut Ring, mem: &GuestMem, pass: &mut RingPass) -> Vec<u16> {
        let mut chain = Chain::default();
        let mut heads = Vec::new();
        while pass.pop(ring, mem, &mut chain) {
            assert!(kicks_off(mem), "kicks are off while the pass takes chains");
            heads.push(chain.head);
        }
        heads
    }

    #[test]
    fn a_pass_takes_every_chain_in_order_and_turns_kicks_back_on_when_empty() {
        let mut ring = ring_of(16);
        let mem = ring.memory();
        good_chains(&mem, 5);
        let mut pass = RingPass::new(64);
        assert_eq!(heads_of_pass(&mut ring, &mem, &mut pass), [0, 1, 2, 3, 4]);
        assert_eq!(pass.end(), PassEnd::Empty);
        assert_eq!(pass.end(), PassEnd::Empty);
        assert_eq!(pass.taken(), 5);
        assert!(!kicks_off(&mem), "an empty ring leaves kicks on");
        // Chains published later are found by the same pass, within its budget.
        desc(&mem, 5, 0x9000, 16);
        publish(&mem, 6);
        let mut chain = Chain::default();
        assert!(pass.pop(&mut ring, &mem, &mut chain));
        assert_eq!(chain.head, 5);
        assert_eq!(pass.taken(), 6);
        assert_eq!(pass.end(), PassEnd::Open);
    }

    #[test]
    fn a_pass_stops_at_its_budget_with_kicks_left_off() {
        let mut ring = ring_of(16);
        let mem = ring.memory();
        good_chains(&mem, 10);
        let mut pass = RingPass::new(4);
        assert_eq!(heads_of_pass(&mut ring, &mem, &mut pass), [0, 1, 2, 3]);
        assert_eq!(pass.end(), PassEnd::Budget);
        assert!(
            kicks_off(&mem),
            "the device comes back on its own: no kicks"
        );
        assert_eq!(ring.next_avail(), 4, "the rest stays in the ring");
        // A new pass goes on where this one stopped.
        let mut next = RingPass::new(64);
        assert_eq!(
            heads_of_pass(&mut ring, &mem, &mut next),
            [4, 5, 6, 7, 8, 9]
        );
        assert_eq!(next.end(), PassEnd::Empty);
    }

    #[test]
    fn a_device_that_stops_early_leaves_kicks_off_and_the_rest_in_the_ring() {
        let mut ring = ring_of(16);
        let mem = ring.memory();
        good_chains(&mem, 3);
        let mut pass = RingPass::new(64);
        let mut chain = Chain::default();
        assert!(pass.pop(&mut ring, &mem, &mut chain));
        assert_eq!(pass.end(), PassEnd::Open);
        assert!(kicks_off(&mem));
        assert_eq!(ring.next_avail(), 1);
    }

    #[test]
    fn a_held_pass_turns_kicks_off_even_after_an_empty_ring() {
        let mut ring = ring_of(16);
        let mem = ring.memory();
        let mut pass = RingPass::new(64);
        let mut chain = Chain::default();
        assert!(!pass.pop(&mut ring, &mem, &mut chain));
        assert!(!kicks_off(&mem));
        pass.hold(&mut ring, &mem);
        assert!(kicks_off(&mem));
        assert_eq!(pass.end(), PassEnd::Open);
        // Held before it took anything: kicks off as well.
        let mut ring = ring_of(16);
        let mem = ring.memory();
        RingPass::new(64).hold(&mut ring, &mem);
        assert!(kicks_off(&mem));
    }

    #[test]
    fn an_empty_ring_ends_the_pass_at_once_with_kicks_on() {
        let mut ring = ring_of(16);
        let mem = ring.memory();
        let mut pass = RingPass::new(64);
        let mut chain = Chain::default();
        assert!(!pass.pop(&mut ring, &mem, &mut chain));
        assert_eq!(pass.end(), PassEnd::Empty);
        assert_eq!(pass.taken(), 0);
        assert!(!kicks_off(&mem));
        // A zero budget takes nothing even from a full ring, and leaves kicks off.
        good_chains(&mem, 2);
        let mut none = RingPass::new(0);
        assert!(!none.pop(&mut ring, &mem, &mut chain));
        assert_eq!(none.end(), PassEnd::Budget);
        assert!(kicks_off(&mem));
        assert_eq!(ring.next_avail(), 0);
    }

    /// A ring of malformed chains ends the pass when the round is spent, not when the
    /// budget is (skipped chains are not "taken"), and without turning kicks on: the
    /// worker comes back for the rest on its own.
    #[test]
    fn malformed_chains_spend_the_round_and_end_the_pass() {
        let mut ring = ring_of(256);
        let mem = ring.memory();
        for i in 0..200u16 {
            desc(&mem, i, 1 << 40, 16);
        }
        publish(&mem, 200);
        let mut pass = RingPass::new(64);
        let mut chain = Chain::default();
        assert!(!pass.pop(&mut ring, &mem, &mut chain));
        assert_eq!(pass.end(), PassEnd::RoundSpent);
        assert_eq!(pass.taken(), 0);
        assert!(kicks_off(&mem));
        let skipped = used_idx(&mem);
        assert!(skipped > 0 && skipped < 200, "a bounded share: {skipped}");
        assert_eq!(ring.next_avail(), skipped);
    }
}
