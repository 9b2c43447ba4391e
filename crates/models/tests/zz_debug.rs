use candle_core::Device;
use sd_models::samplers::*;
#[test]
fn dbg() {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string("tests/fixtures/samplers/zsnr_trailing_v.json").unwrap()).unwrap();
    let cfg = SchedulerConfig::from_json(&v["config"], std::path::Path::new("x")).unwrap();
    let mut s = build_sampler(SamplerKind::EulerAncestral, &cfg, 3).unwrap();
    println!("ts {:?} init {}", s.timesteps(), s.init_noise_sigma());
    let shape = [2usize,2,2,3];
    let mut rng = TorchRng::new(1234);
    let lat = (rng.randn(&shape, &Device::Cpu).unwrap() * s.init_noise_sigma()).unwrap();
    let base = TorchRng::new(2234).randn(&shape, &Device::Cpu).unwrap();
    let x = s.scale_model_input(&lat, 0).unwrap();
    let mo = (x.affine(0.5,0.).unwrap() + base.affine(0.3f32 as f64, 0.).unwrap()).unwrap();
    let out = s.step(&mo, 0, &lat, &mut rng).unwrap();
    println!("{:?}", out.flatten_all().unwrap().to_vec1::<f32>().unwrap()[10]);
}
