//! Seeded randomness: SplitMix64, and the uniform floats and Fisher-Yates shuffle it drives, so that
//! every random choice of a run (data order, weights, retries' jitter) is reproducible from a seed on
//! every machine.

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64: the next value of the stream in `state`.
pub fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GAMMA);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The first value of the SplitMix64 stream that starts at `x`: a well-mixed hash of `x`.
pub fn mix(x: u64) -> u64 {
    splitmix(&mut { x })
}

/// The next value of the stream in `state` as a uniform float in [0, 1), from its top 53 bits.
pub fn unit(state: &mut u64) -> f64 {
    (splitmix(state) >> 11) as f64 / (1u64 << 53) as f64
}

/// Shuffles `items` in place (Fisher-Yates) with the SplitMix64 stream in `state`.
pub fn shuffle<T>(items: &mut [T], state: &mut u64) {
    for i in (1..items.len()).rev() {
        let j = (splitmix(state) % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_splitmix64() {
        // The reference values of SplitMix64 from seed 0 (Vigna's splitmix64.c).
        let mut state = 0;
        assert_eq!(splitmix(&mut state), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix(&mut state), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(mix(0), 0xE220_A839_7B1D_CDAF);
        let mut items: Vec<u32> = (0..10).collect();
        shuffle(&mut items, &mut 7);
        let mut sorted = items.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert!((0..1000).map(|_| unit(&mut state)).all(|u| (0.0..1.0).contains(&u)));
    }
}
