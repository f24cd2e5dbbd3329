//! The fused CPU RMSNorm (`trainer/csrc/rms_norm.cpp` through `kernels::rms_norm`) against the composite
//! it replaces (`RmsNorm::composite`: transformers' LlamaRMSNorm operation by operation, which
//! `hf_parity.rs` pins to transformers itself), forward and both gradients, in fp32 and bf16, over row
//! widths that are and are not multiples of the kernel's 16 lanes.
//!
//! Tolerances: the kernel sums each row's squares (and the backward's dot product) in another order
//! than libtorch, which moves fp32 results by a few ulp (~1e-7 relative; observed differences are
//! printed). In fp32 the bound is 1e-5 of each tensor's largest value. In bf16 the same fp32 difference
//! can flip a rounding: each element may differ by one bf16 step (2^-7 of its magnitude) and no more,
//! and only a small share of elements may differ at all (under 2%); a missing or misplaced rounding
//! (multiplying the weight before rounding, a bf16 sum) moves most elements.

use ferrotune_trainer::kernels;
use ferrotune_trainer::model::RmsNorm;
use tch::{nn, Device, Kind, Tensor};

const EPS: f64 = 1e-5;

fn norm(c: i64, kind: Kind, seed: i64) -> (nn::VarStore, RmsNorm) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let n = RmsNorm::new(&vs.root(), c, EPS, kind);
    tch::no_grad(|| n.weight.shallow_clone().copy_(&(Tensor::randn([c], (Kind::Float, Device::Cpu)) * 0.1 + 1.0)));
    (vs, n)
}

/// y, dL/dx, dL/dw for L = sum(y * gy), through `f`.
fn run(f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, w: &Tensor, gy: &Tensor) -> (Tensor, Tensor, Tensor) {
    let x = x.detach().set_requires_grad(true);
    for g in [&x, w] {
        let mut g = g.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let y = f(&x);
    (&y * gy).sum(Kind::Float).backward();
    (y.detach(), x.grad().copy(), w.grad().copy())
}

/// Checks `ours` against `reference` under the tolerance of `kind` (see the header).
fn close(what: &str, ours: &Tensor, reference: &Tensor, kind: Kind) {
    assert_eq!(ours.kind(), reference.kind(), "{what}");
    let (a, b) = (ours.to_kind(Kind::Double), reference.to_kind(Kind::Double));
    let diff = (&a - &b).abs();
    let max = b.abs().max().double_value(&[]);
    let worst = diff.max().double_value(&[]);
    let differing = diff.gt(0.0).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    println!("{what}: max |diff| {worst:.3e} of max |ref| {max:.3e}, {:.2}% of elements differ", differing * 100.0);
    if kind == Kind::Float {
        assert!(worst <= 1e-5 * max, "{what}: {worst:e} > 1e-5 * {max:e}");
    } else {
        // One bf16 step of each element (plus the fp32 noise of a near-cancelling sum), on few elements.
        let step = b.abs() * 2f64.powi(-7) + 1e-6 * max;
        let over = diff.gt_tensor(&step).sum(Kind::Int64).int64_value(&[]);
        assert!(over == 0, "{what}: {over} elements differ by more than one bf16 step");
        assert!(differing < 0.02, "{what}: {:.1}% of elements differ", differing * 100.0);
    }
}

#[test]
fn this_build_has_the_fused_kernel_and_it_declines_what_it_does_not_cover() {
    // Without it (a build lacking csrc/rms_norm.cpp, or FERROTUNE_RMS_NORM=composite) the comparisons
    // below would compare the composite with itself.
    assert!(kernels::fused_rms_norm_enabled(), "the fused RMSNorm is not in use in this test run");
    let w = Tensor::ones([8], (Kind::Float, Device::Cpu));
    assert!(kernels::rms_norm(&Tensor::ones([2, 8], (Kind::Float, Device::Cpu)), &w, EPS).is_some());
    // fp16, a weight of another dtype, a width that does not match: the composite's.
    assert!(kernels::rms_norm(&Tensor::ones([2, 8], (Kind::Half, Device::Cpu)), &w.to_kind(Kind::Half), EPS).is_none());
    assert!(kernels::rms_norm(&Tensor::ones([2, 8], (Kind::BFloat16, Device::Cpu)), &w, EPS).is_none());
    assert!(kernels::rms_norm(&Tensor::ones([2, 7], (Kind::Float, Device::Cpu)), &w, EPS).is_none());
}

#[test]
fn fused_equals_the_composite_forward_and_backward_in_fp32_and_bf16() {
    for kind in [Kind::Float, Kind::BFloat16] {
        // (batch, tokens, width): SmolLM2's 576, an odd width, a row shorter than the 16 lanes, one row.
        for (i, &(b, t, c)) in [(2, 130, 576), (3, 7, 100), (4, 5, 9), (1, 1, 64)].iter().enumerate() {
            let (_vs, n) = norm(c, kind, i as i64);
            let _ = n.weight.shallow_clone().set_requires_grad(true);
            // Rows of different scales, as a residual stream has.
            let scale = Tensor::rand([b, t, 1], (Kind::Float, Device::Cpu)) * 8.0 + 0.01;
            let x = (Tensor::randn([b, t, c], (Kind::Float, Device::Cpu)) * scale).to_kind(kind);
            let gy = Tensor::randn([b, t, c], (Kind::Float, Device::Cpu)).to_kind(kind);
            let (y0, gx0, gw0) = run(&|x| n.composite(x), &x, &n.weight, &gy);
            let (y1, gx1, gw1) = run(&|x| n.forward(x), &x, &n.weight, &gy);
            let what = format!("{kind:?} ({b}, {t}, {c})");
            close(&format!("{what} y"), &y1, &y0, kind);
            close(&format!("{what} dx"), &gx1, &gx0, kind);
            close(&format!("{what} dw"), &gw1, &gw0, kind);
            // Without autograd the forward is the same.
            let y2 = tch::no_grad(|| n.forward(&x));
            assert!(y2.equal(&y1), "{what}: no_grad forward differs");
        }
    }
}

#[test]
fn only_the_gradients_asked_for_are_computed_and_they_are_the_same() {
    for kind in [Kind::Float, Kind::BFloat16] {
        let (_vs, n) = norm(64, kind, 7);
        let x = Tensor::randn([3, 20, 64], (Kind::Float, Device::Cpu)).to_kind(kind);
        let gy = Tensor::randn([3, 20, 64], (Kind::Float, Device::Cpu)).to_kind(kind);
        // Both.
        let _ = n.weight.shallow_clone().set_requires_grad(true);
        let (_, gx, gw) = run(&|x| n.forward(x), &x, &n.weight, &gy);
        // Only x (LoRA: the norm's weight is frozen).
        let _ = n.weight.shallow_clone().set_requires_grad(false);
        let xg = x.detach().set_requires_grad(true);
        (n.forward(&xg) * &gy).sum(Kind::Float).backward();
        assert!(xg.grad().equal(&gx), "{kind:?}: dx alone differs");
        // Only w (the first layer's input comes from a frozen embedding).
        let _ = n.weight.shallow_clone().set_requires_grad(true);
        let mut g = n.weight.grad();
        let _ = g.zero_();
        (n.forward(&x) * &gy).sum(Kind::Float).backward();
        assert!(n.weight.grad().equal(&gw), "{kind:?}: dw alone differs");
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let (_vs, n) = norm(576, Kind::BFloat16, 3);
    let _ = n.weight.shallow_clone().set_requires_grad(true);
    let x = Tensor::randn([1, 300, 576], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
    let gy = Tensor::randn([1, 300, 576], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
    let threads = tch::get_num_threads();
    let mut seen = vec![];
    for t in [1, 2, 3] {
        tch::set_num_threads(t);
        seen.push(run(&|x| n.forward(x), &x, &n.weight, &gy));
    }
    tch::set_num_threads(threads);
    for (t, (y, gx, gw)) in seen.iter().enumerate().skip(1) {
        assert!(y.equal(&seen[0].0) && gx.equal(&seen[0].1) && gw.equal(&seen[0].2), "{} threads differ from 1", t + 1);
    }
}
