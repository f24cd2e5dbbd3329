//! ferrotune's fused CPU kernels (`trainer/csrc`, through `kernels`) against the composites they replace,
//! forward and every gradient, in fp32 and bf16: RMSNorm against `RmsNorm::composite` (transformers'
//! LlamaRMSNorm operation by operation, which `hf_parity.rs` pins to transformers itself), silu(a) * b
//! against libtorch's silu and mul, the rotary embedding against `rope::composite`.
//!
//! Tolerances. RMSNorm sums each row's squares (and the backward's dot product) in another order than
//! libtorch, and SwiGLU's exp is its own (`csrc/common.h`) rather than libtorch's Sleef: both move fp32
//! results by a few ulp (~1e-7 relative; observed differences are printed). In fp32 the bound is 1e-5 of
//! each tensor's largest value. In bf16 the same fp32 difference can flip a rounding: each element may
//! differ by one bf16 step (2^-7 of its magnitude) and no more, and only a small share of elements may
//! differ at all (under 2%); a missing or misplaced rounding (multiplying the weight before rounding, a
//! bf16 sum, silu's output unrounded) moves most elements. The rotary embedding sums nothing in another
//! order and must equal the composite bit for bit.

use ferrotune_trainer::kernels::{self, Kernel};
use ferrotune_trainer::model::RmsNorm;
use ferrotune_trainer::rope;
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
    // Without it (a build lacking csrc/rms_norm.cpp, or FERROTUNE_COMPOSITE=rms_norm) the comparisons
    // below would compare the composite with itself.
    assert!(kernels::enabled(Kernel::RmsNorm), "the fused RMSNorm is not in use in this test run");
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

/// y, da, db for L = sum(y * gy), y = f(a, b).
fn run2(f: &dyn Fn(&Tensor, &Tensor) -> Tensor, a: &Tensor, b: &Tensor, gy: &Tensor) -> (Tensor, Tensor, Tensor) {
    let (a, b) = (a.detach().set_requires_grad(true), b.detach().set_requires_grad(true));
    let y = f(&a, &b);
    (&y * gy).sum(Kind::Float).backward();
    (y.detach(), a.grad(), b.grad())
}

fn swiglu(a: &Tensor, b: &Tensor) -> Tensor {
    kernels::swiglu_kernel(a, b).expect("the fused SwiGLU declined fp32/bf16 CPU tensors")
}

#[test]
fn fused_swiglu_equals_silu_times_up_forward_and_backward() {
    assert!(kernels::enabled(Kernel::Swiglu), "the fused SwiGLU is not in use in this test run");
    for kind in [Kind::Float, Kind::BFloat16] {
        // SmolLM2's MLP width, sizes that do not fill a vector, one element; gate values of a real MLP's
        // spread and beyond it (silu saturates at both ends, where exp over- and underflows).
        for (i, shape) in [vec![2, 70, 1536], vec![3, 7, 13], vec![1]].into_iter().enumerate() {
            tch::manual_seed(i as i64);
            let a = (Tensor::randn(&shape, (Kind::Float, Device::Cpu)) * if i == 0 { 4.0 } else { 40.0 }).to_kind(kind);
            let b = Tensor::randn(&shape, (Kind::Float, Device::Cpu)).to_kind(kind);
            let gy = Tensor::randn(&shape, (Kind::Float, Device::Cpu)).to_kind(kind);
            let (y0, ga0, gb0) = run2(&|a, b| a.silu() * b, &a, &b, &gy);
            let (y1, ga1, gb1) = run2(&swiglu, &a, &b, &gy);
            let what = format!("swiglu {kind:?} {shape:?}");
            close(&format!("{what} y"), &y1, &y0, kind);
            close(&format!("{what} da"), &ga1, &ga0, kind);
            close(&format!("{what} db"), &gb1, &gb0, kind);
            assert!(tch::no_grad(|| swiglu(&a, &b)).equal(&y1), "{what}: no_grad forward differs");
        }
    }
}

#[test]
fn fused_swiglu_at_the_edges_of_exp() {
    // Where exp(-a) overflows (a < -88.7), underflows (a > 87.3) or meets infinities and NaN, the fused
    // kernel gives what libtorch's silu and silu_backward give, element by element.
    let edges = [
        0.0f32,
        -0.0,
        1e-30,
        -1e-30,
        20.0,
        -20.0,
        87.0,
        87.5,
        88.5,
        89.0,
        -86.5,
        -87.5,
        -88.5,
        -88.8,
        -89.0,
        -100.0,
        100.0,
        1e30,
        -1e30,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ];
    let a = Tensor::from_slice(&edges);
    let b = Tensor::from_slice(&edges.map(|_| 1.5f32));
    let gy = Tensor::from_slice(&edges.map(|_| 0.75f32));
    let (y0, ga0, gb0) = run2(&|a, b| a.silu() * b, &a, &b, &gy);
    let (y1, ga1, gb1) = run2(&swiglu, &a, &b, &gy);
    for (name, ours, reference) in [("y", &y1, &y0), ("da", &ga1, &ga0), ("db", &gb1, &gb0)] {
        let (o, r) = (Vec::<f32>::try_from(ours).unwrap(), Vec::<f32>::try_from(reference).unwrap());
        for ((x, o), r) in edges.iter().zip(&o).zip(&r) {
            let same = (o.is_nan() && r.is_nan()) || o == r || (o - r).abs() <= 1e-6 * r.abs();
            assert!(same, "{name} at a = {x}: fused {o:e}, composite {r:e}");
        }
    }
}

/// x (B, H, T, D) as the attention makes it, the projections' (B, T, H, D) seen transposed, or contiguous.
fn rope_input(b: i64, h: i64, t: i64, d: i64, transposed: bool, kind: Kind) -> Tensor {
    let x = Tensor::randn([b, t, h, d], (Kind::Float, Device::Cpu)).to_kind(kind);
    if transposed {
        x.transpose(1, 2)
    } else {
        x.transpose(1, 2).contiguous()
    }
}

#[test]
fn fused_rope_equals_the_composite_bit_for_bit() {
    assert!(kernels::enabled(Kernel::Rope), "the fused rope is not in use in this test run");
    for kind in [Kind::Float, Kind::BFloat16] {
        // SmolLM2's 9 heads of 64 over two rows, tables per row or one shared; a small odd half.
        for (i, &(b, h, t, d, per_row, transposed)) in
            [(2, 9, 37, 64, true, true), (2, 3, 5, 64, false, false), (1, 2, 4, 6, true, true)].iter().enumerate()
        {
            tch::manual_seed(10 + i as i64);
            let x = rope_input(b, h, t, d, transposed, kind);
            let positions = Tensor::randint(4096, [if per_row { b } else { 1 }, t], (Kind::Int64, Device::Cpu));
            let inv_freq = Tensor::rand([d / 2], (Kind::Float, Device::Cpu));
            let (cos, sin) = rope::cos_sin(&inv_freq, &positions, kind);
            // The gradient arrives as attention hands it back: another layout than x's.
            let gy = Tensor::randn([b, h, d, t], (Kind::Float, Device::Cpu)).to_kind(kind).transpose(2, 3);
            let go = |f: &dyn Fn(&Tensor) -> Tensor| {
                let x = x.detach().set_requires_grad(true);
                let y = f(&x);
                (&y * &gy).sum(Kind::Float).backward();
                (y.detach(), x.grad())
            };
            let (y0, g0) = go(&|x| rope::composite(x, &cos, &sin));
            let (y1, g1) = go(&|x| kernels::rope(x, &cos, &sin).expect("the fused rope declined"));
            let what = format!("rope {kind:?} ({b}, {h}, {t}, {d})");
            assert!(y1.equal(&y0), "{what}: forward differs by {}", max_diff(&y1, &y0));
            assert!(g1.equal(&g0), "{what}: backward differs by {}", max_diff(&g1, &g0));
            assert_eq!(y1.stride(), x.stride(), "{what}: the result keeps x's layout");
            // The model's path takes the kernel.
            assert!(rope::apply(&x, &cos, &sin).equal(&y0), "{what}: rope::apply differs");
        }
    }
}

#[test]
fn fused_kernels_decline_what_they_do_not_cover() {
    let f = |s: &[i64], k: Kind| Tensor::ones(s, (k, Device::Cpu));
    assert!(kernels::swiglu(&f(&[4], Kind::Float), &f(&[4], Kind::Float)).is_some());
    // The model keeps the composite in bf16 (kernels::applies has the figures); the kernel computes it.
    assert!(kernels::swiglu(&f(&[4], Kind::BFloat16), &f(&[4], Kind::BFloat16)).is_none());
    assert!(kernels::swiglu_kernel(&f(&[4], Kind::BFloat16), &f(&[4], Kind::BFloat16)).is_some());
    assert!(kernels::swiglu_kernel(&f(&[4], Kind::Half), &f(&[4], Kind::Half)).is_none());
    assert!(kernels::swiglu_kernel(&f(&[4], Kind::Float), &f(&[4], Kind::BFloat16)).is_none());
    assert!(kernels::swiglu_kernel(&f(&[4], Kind::Float), &f(&[2, 2], Kind::Float)).is_none());
    let t = f(&[1, 3, 6], Kind::Float);
    assert!(kernels::rope(&f(&[1, 2, 3, 6], Kind::Float), &t, &t).is_some());
    assert!(kernels::rope(&f(&[1, 2, 3, 5], Kind::Float), &f(&[1, 3, 5], Kind::Float), &f(&[1, 3, 5], Kind::Float))
        .is_none());
    assert!(kernels::rope(&f(&[1, 2, 3, 6], Kind::BFloat16), &t, &t).is_none());
    assert!(kernels::rope(&f(&[1, 2, 4, 6], Kind::Float), &t, &t).is_none());
    assert!(kernels::rope(&f(&[2, 3, 6], Kind::Float), &t, &t).is_none());
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

#[test]
fn fused_rope_walks_a_layout_whose_rows_are_not_contiguous() {
    // x whose last stride is not 1 (a (B, H, D, T) tensor seen transposed): copied contiguous inside.
    for kind in [Kind::Float, Kind::BFloat16] {
        tch::manual_seed(21);
        let x = Tensor::randn([1, 2, 8, 5], (Kind::Float, Device::Cpu)).to_kind(kind).transpose(2, 3);
        let positions = Tensor::randint(64, [1, 5], (Kind::Int64, Device::Cpu));
        let (cos, sin) = rope::cos_sin(&Tensor::rand([4], (Kind::Float, Device::Cpu)), &positions, kind);
        let ours = kernels::rope(&x, &cos, &sin).expect("the fused rope declined");
        assert!(
            ours.equal(&rope::composite(&x, &cos, &sin)),
            "{kind:?}: {}",
            max_diff(&ours, &rope::composite(&x, &cos, &sin))
        );
    }
}
