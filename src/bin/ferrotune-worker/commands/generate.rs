//! `ferrotune generate`: loads a model, renders each `--chat` question through the model's chat
//! template, decodes greedily in one batch and prints the answers.

use anyhow::{Context, Result};
use ferrotune::cli::GenerateArgs;
use ferrotune_data::{ChatTemplate, Message, Tokenizer};
use ferrotune_trainer::train::usable_device;
use ferrotune_trainer::{generate, load_model, resolve_dtype};
use std::time::Instant;

pub fn run(args: GenerateArgs) -> Result<()> {
    let device = usable_device(&args.device).context("--device")?;
    let (kind, why) = resolve_dtype(&args.dtype, device).context("--dtype")?;
    tracing::info!("compute dtype {} ({why})", ferrotune_trainer::kind_name(kind));
    let t0 = Instant::now();
    let model = load_model(&args.model, kind, device).context("loading the model")?;
    let tokenizer = Tokenizer::from_dir(&args.model)?;
    let template = ChatTemplate::load(&args.model, &args.template)?;
    tracing::info!("loaded {} in {:.1}s", args.model.display(), t0.elapsed().as_secs_f64());
    let mut prompts = vec![];
    for q in &args.chat {
        let mut messages = vec![];
        if let Some(s) = &args.system {
            messages.push(Message::new("system", s));
        }
        messages.push(Message::new("user", q));
        let text = template.render(&messages, true)?;
        prompts.push(tokenizer.encode(&text)?.into_iter().map(i64::from).collect::<Vec<_>>());
    }
    let t1 = Instant::now();
    let outputs = generate::greedy(&model, &prompts, args.max_new_tokens, &model.config.eos_token_ids);
    let new_tokens: usize = outputs.iter().map(Vec::len).sum();
    for (q, out) in args.chat.iter().zip(&outputs) {
        let ids: Vec<u32> = out.iter().map(|&t| t as u32).collect();
        println!("user: {q}\nassistant: {}\n", tokenizer.decode(&ids)?.trim());
    }
    let secs = t1.elapsed().as_secs_f64();
    tracing::info!("generated {new_tokens} tokens in {secs:.1}s ({:.1} tokens/s)", new_tokens as f64 / secs);
    Ok(())
}
