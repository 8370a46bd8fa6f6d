//! Which MSI-X vector serves which interrupt source of the device.
//!
//! virtio lets the driver route configuration changes and each virtqueue
//! to any MSI-X vector, several sources sharing one (virtio 1.2
//! §4.1.4.3, §4.1.5.1.2). rvscsi wants `1 + queues` vectors: vector 0 for
//! the rare sources (configuration changes and the event queue; the control
//! queue is polled and has none), one vector per request queue after it.
//! With fewer, the request queues share the vectors after the first
//! round-robin (queue `q` on `1 + q % (vectors - 1)`); with one, everything
//! is on vector 0. The grant can change while the driver runs (an IRM
//! callback), so the handler of a vector asks the current layout what it
//! serves; a vector past the current count (one being given back, or just
//! added) serves every request queue.

/// The routing for a number of vectors and request queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLayout {
    vectors: u16,
    queues: u16,
}

impl MsixLayout {
    /// How many vectors the driver asks for: one per request queue and one
    /// for configuration changes and events.
    pub fn wanted(queues: u16) -> usize {
        1 + usize::from(queues)
    }

    /// The layout for `vectors` granted (at least one is used; more than
    /// [`Self::wanted`] are not) and `queues` request queues.
    pub fn new(vectors: usize, queues: u16) -> Self {
        let most = Self::wanted(queues);
        MsixLayout {
            vectors: vectors.clamp(1, most) as u16,
            queues,
        }
    }

    /// Vectors in use.
    pub fn vectors(&self) -> usize {
        usize::from(self.vectors)
    }

    /// The vector of configuration changes.
    pub fn config_vector(&self) -> u16 {
        0
    }

    /// The vector of the event queue.
    pub fn event_vector(&self) -> u16 {
        0
    }

    /// The vector of request queue `q`.
    pub fn queue_vector(&self, q: u16) -> u16 {
        if self.vectors <= 1 {
            0
        } else {
            1 + q % (self.vectors - 1)
        }
    }

    /// Whether vector `v` serves configuration changes and the event queue.
    pub fn serves_config_and_events(&self, v: u16) -> bool {
        v == 0
    }

    /// The request queues vector `v` serves: those routed to it, or all of
    /// them for a vector outside the layout (interrupts that were raised on
    /// it before the routing changed).
    pub fn queues_of(&self, v: u16) -> QueuesOf {
        let (first, step) = if v >= self.vectors || self.vectors == 1 {
            (0, 1)
        } else if v == 0 {
            (self.queues, 1) // none
        } else {
            (v - 1, self.vectors - 1)
        };
        QueuesOf {
            next: first,
            step,
            end: self.queues,
        }
    }
}

/// The request queues of one vector (see [`MsixLayout::queues_of`]).
#[derive(Clone, Debug)]
pub struct QueuesOf {
    next: u16,
    step: u16,
    end: u16,
}

impl Iterator for QueuesOf {
    type Item = u16;
    fn next(&mut self) -> Option<u16> {
        if self.next >= self.end {
            return None;
        }
        let q = self.next;
        self.next = self.next.saturating_add(self.step.max(1));
        Some(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// Every queue is served by exactly the vector it is routed to, and
    /// every vector in use serves something.
    fn check(vectors: usize, queues: u16) {
        let l = MsixLayout::new(vectors, queues);
        assert!(l.vectors() >= 1 && l.vectors() <= MsixLayout::wanted(queues));
        for q in 0..queues {
            let v = l.queue_vector(q);
            assert!(
                usize::from(v) < l.vectors(),
                "{vectors}/{queues}: q{q} on {v}"
            );
            for w in 0..l.vectors() as u16 {
                let served = l.queues_of(w).any(|x| x == q);
                assert_eq!(served, w == v, "{vectors}/{queues}: q{q} by vector {w}");
            }
        }
        assert!(l.serves_config_and_events(l.config_vector()));
        assert_eq!(l.config_vector(), l.event_vector());
        for w in 1..l.vectors() as u16 {
            assert!(
                !l.serves_config_and_events(w),
                "{vectors}/{queues}: vector {w} is a request queue's only"
            );
            assert!(
                l.queues_of(w).next().is_some(),
                "{vectors}/{queues}: vector {w} idle"
            );
        }
    }

    #[test]
    fn every_queue_is_served_by_exactly_its_vector_for_any_grant() {
        for queues in 1..=17u16 {
            for vectors in 0..=20 {
                check(vectors, queues);
            }
        }
    }

    #[test]
    fn one_vector_serves_everything() {
        let l = MsixLayout::new(1, 4);
        assert_eq!(l.queues_of(0).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert!((0..4).all(|q| l.queue_vector(q) == 0));
    }

    #[test]
    fn two_vectors_put_every_request_queue_on_the_second() {
        let l = MsixLayout::new(2, 4);
        assert_eq!(l.queues_of(0).count(), 0);
        assert_eq!(l.queues_of(1).collect::<Vec<_>>(), [0, 1, 2, 3]);
    }

    #[test]
    fn a_full_grant_gives_each_queue_its_own_vector_after_vector_0() {
        let l = MsixLayout::new(5, 4);
        assert_eq!(
            (0..4).map(|q| l.queue_vector(q)).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        // More than wanted: the extra are not used.
        assert_eq!(MsixLayout::new(9, 4), l);
    }

    #[test]
    fn fewer_vectors_than_queues_share_round_robin() {
        let l = MsixLayout::new(3, 5);
        assert_eq!(
            (0..5).map(|q| l.queue_vector(q)).collect::<Vec<_>>(),
            [1, 2, 1, 2, 1]
        );
        assert_eq!(l.queues_of(1).collect::<Vec<_>>(), [0, 2, 4]);
        assert_eq!(l.queues_of(2).collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn a_vector_outside_the_layout_serves_every_queue() {
        let l = MsixLayout::new(3, 4);
        assert_eq!(l.queues_of(7).collect::<Vec<_>>(), [0, 1, 2, 3]);
    }
}
