//! `zk0-train doctor`: one small matmul per device, reported as JSON.

use std::time::Instant;

use serde_json::{json, Value};
use tch::{Cuda, Device, Kind, Tensor};

fn probe(device: Device) -> Value {
    let t0 = Instant::now();
    let r = std::panic::catch_unwind(|| {
        let a = Tensor::arange(16, (Kind::Float, device)).view([4, 4]);
        let b = a.matmul(&a.transpose(0, 1)).sum(Kind::Float);
        b.to_device(Device::Cpu).double_value(&[])
    });
    match r {
        // Σ_ij (A·Aᵀ)_ij = Σ_k (column sum k)² = 24² + 28² + 32² + 36² = 3680 for A = arange(16).view(4, 4).
        Ok(v) => json!({"device": format!("{device:?}"), "ok": v == 3680.0, "result": v,
                        "seconds": t0.elapsed().as_secs_f64()}),
        Err(_) => {
            json!({"device": format!("{device:?}"), "ok": false, "error": "tensor op failed"})
        }
    }
}

pub fn run(version: &str) -> (Value, bool) {
    let mut devices = vec![probe(Device::Cpu)];
    let cuda = Cuda::is_available();
    let n = if cuda { Cuda::device_count() } else { 0 };
    for i in 0..n {
        devices.push(probe(Device::Cuda(i as usize)));
    }
    let ok = devices.iter().all(|d| d["ok"] == json!(true));
    let report = json!({
        "version": version,
        "threads": tch::get_num_threads(),
        "cuda_available": cuda,
        "cuda_device_count": n,
        "devices": devices,
        "ok": ok,
    });
    (report, ok)
}
