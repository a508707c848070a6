//! Decoding sequences from the wire with a bound checked before anything is allocated: a
//! length field from a peer never decides how much memory we reserve.
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};

/// Deserializes a `Vec<T>` of at most `max` elements, refusing a larger announced length
/// before allocating and a longer sequence as soon as it exceeds `max`. `what` names the
/// elements in the error ("guests", "bitmap words").
pub fn bounded_vec<'de, D, T>(d: D, max: usize, what: &'static str) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T> {
        max: usize,
        what: &'static str,
        t: PhantomData<T>,
    }
    impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "at most {} {}", self.max, self.what)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let n = seq.size_hint().unwrap_or(0);
            if n > self.max {
                return Err(A::Error::custom(format_args!(
                    "{n} {} (at most {})",
                    self.what, self.max
                )));
            }
            let mut v = Vec::with_capacity(n);
            while let Some(x) = seq.next_element()? {
                if v.len() == self.max {
                    return Err(A::Error::custom(format_args!("more than {} {}", self.max, self.what)));
                }
                v.push(x);
            }
            Ok(v)
        }
    }
    d.deserialize_seq(V {
        max,
        what,
        t: PhantomData,
    })
}
