//! `relance apply -f PATH` and `relance segment list|get|count|members|preview`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use relance_proto::v1 as pb;

use crate::client::{Clients, Target};

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// A YAML file (several documents separated by `---` are fine) or a directory of them.
    #[arg(short = 'f', long = "file", required = true)]
    pub files: Vec<PathBuf>,
    /// Validate only: report problems, store nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Wait until every applied segment's membership is built.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, clap::Subcommand)]
pub enum SegmentCommand {
    /// List the workspace's segments with their size.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Show a segment's definition and status.
    Get {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// The exact number of members.
    Count {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Print the members, one per line (`c:<customer_id>` or `v:<anonymous_id>`, entry time).
    Members {
        name: String,
        /// At most this many (0: all).
        #[arg(long, default_value_t = 0)]
        limit: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Size and a sample of a definition that is not applied.
    Preview {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Members to show.
        #[arg(long, default_value_t = 10)]
        sample: u32,
        #[command(flatten)]
        target: Target,
    },
}

/// A document read from disk, with where it came from.
struct Document {
    origin: String,
    kind: String,
    yaml: String,
}

fn read_documents(paths: &[PathBuf]) -> anyhow::Result<Vec<Document>> {
    let mut files: Vec<PathBuf> = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading {}", path.display()))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    let mut documents = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        for (i, yaml) in relance_kit::yaml::split_documents(&text)
            .into_iter()
            .enumerate()
        {
            let kind = relance_kit::yaml::parse(&yaml)
                .ok()
                .and_then(|root| root.get("kind").and_then(|k| k.as_str()).map(str::to_owned))
                .unwrap_or_default();
            documents.push(Document {
                origin: if i == 0 {
                    display(&file)
                } else {
                    format!("{} (document {})", display(&file), i + 1)
                },
                kind,
                yaml,
            });
        }
    }
    Ok(documents)
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// Applies every document. Segments that refer to others (`in_segment`) are retried after
/// the rest, so a directory applies whatever its file order.
pub async fn apply(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    let documents = read_documents(&args.files)?;
    if documents.is_empty() {
        anyhow::bail!("-f: no YAML documents found");
    }
    let mut clients = args.target.connect().await?;
    let mut pending: Vec<&Document> = Vec::new();
    // Flows and broadcasts name segments: they are applied once the segments are.
    let mut later: Vec<&Document> = Vec::new();
    let mut failed = 0;
    for document in &documents {
        match document.kind.as_str() {
            "Segment" => pending.push(document),
            "Flow" | "Broadcast" => later.push(document),
            other => {
                eprintln!(
                    "{}: kind: {other:?} is not a kind Relance knows (Segment, Flow, Broadcast)",
                    document.origin
                );
                failed += 1;
            }
        }
    }
    let mut applied_names = Vec::new();
    loop {
        let mut waiting = Vec::new();
        let before = pending.len();
        for document in pending {
            let outcome = clients
                .segments
                .apply(pb::ApplySegmentRequest {
                    yaml: document.yaml.clone(),
                    dry_run: args.dry_run,
                })
                .await;
            match outcome {
                Ok(response) => {
                    let response = response.into_inner();
                    if !response.errors.is_empty() {
                        failed += 1;
                        for error in &response.errors {
                            eprintln!(
                                "{}:{}:{}: {}: {}",
                                document.origin,
                                error.line,
                                error.column,
                                error.field,
                                error.reason
                            );
                        }
                        continue;
                    }
                    let what = match (args.dry_run, response.changed) {
                        (true, true) => "would be applied",
                        (true, false) => "unchanged",
                        (false, true) => "applied",
                        (false, false) => "unchanged",
                    };
                    println!(
                        "segment/{} {what} (version {})",
                        response.name, response.version
                    );
                    applied_names.push(response.name);
                }
                Err(status) if status.message().contains("no active segment named") => {
                    waiting.push((document, status));
                }
                Err(status) => {
                    failed += 1;
                    for line in status.message().lines() {
                        eprintln!("{}: {line}", document.origin);
                    }
                }
            }
        }
        if waiting.is_empty() {
            break;
        }
        if waiting.len() == before {
            for (document, status) in &waiting {
                for line in status.message().lines() {
                    eprintln!("{}: {line}", document.origin);
                }
            }
            failed += waiting.len();
            break;
        }
        pending = waiting.into_iter().map(|(d, _)| d).collect();
    }
    if args.wait && !args.dry_run {
        wait_until_built(&mut clients, &applied_names).await?;
    }
    for document in later {
        let applied = if document.kind == "Flow" {
            crate::campaign::apply_flow(
                &mut clients,
                &document.origin,
                &document.yaml,
                args.dry_run,
            )
            .await
        } else {
            crate::campaign::apply_broadcast(
                &mut clients,
                &document.origin,
                &document.yaml,
                args.dry_run,
            )
            .await
        };
        if !applied {
            failed += 1;
        }
    }
    Ok(if failed > 0 {
        ExitCode::from(crate::exit::PARTIAL)
    } else {
        ExitCode::SUCCESS
    })
}

/// Every segment of the workspace, page after page.
pub async fn list_all(clients: &mut Clients) -> anyhow::Result<Vec<pb::Segment>> {
    let mut segments = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = clients
            .segments
            .list(pb::ListSegmentsRequest {
                page_token,
                page_size: 1000,
                ..Default::default()
            })
            .await?
            .into_inner();
        segments.extend(page.segments);
        if page.next_page_token.is_empty() {
            return Ok(segments);
        }
        page_token = page.next_page_token;
    }
}

/// Waits until the named segments (all of the workspace's when `names` is empty) answer
/// with their latest version.
pub async fn wait_until_built(clients: &mut Clients, names: &[String]) -> anyhow::Result<()> {
    let mut names = names.to_vec();
    if names.is_empty() {
        names = list_all(clients)
            .await?
            .into_iter()
            .map(|s| s.name)
            .collect();
    }
    for name in &names {
        loop {
            let segment = clients
                .segments
                .get(pb::GetSegmentRequest {
                    name: name.clone(),
                    version: 0,
                })
                .await?
                .into_inner();
            if segment.status == pb::SegmentStatus::Active as i32
                && segment.version == segment.latest_version
            {
                println!("segment/{name} built: {} members", segment.member_count);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

fn status_name(status: i32) -> &'static str {
    match pb::SegmentStatus::try_from(status) {
        Ok(pb::SegmentStatus::Building) => "building",
        Ok(pb::SegmentStatus::Active) => "active",
        Ok(pb::SegmentStatus::Archived) => "archived",
        _ => "?",
    }
}

fn member_line(member: &pb::SegmentMember) -> String {
    let who = match member.customer.as_ref().and_then(|c| c.id.as_ref()) {
        Some(pb::customer_ref::Id::CustomerId(id)) => format!("c:{id}"),
        Some(pb::customer_ref::Id::AnonymousId(id)) => format!("v:{id}"),
        None => "?".to_owned(),
    };
    let at = member
        .entered_at
        .as_ref()
        .and_then(relance_proto::convert::timestamp_to_chrono)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default();
    format!("{who}\t{at}")
}

pub async fn run(command: SegmentCommand) -> anyhow::Result<ExitCode> {
    match command {
        SegmentCommand::List { target } => {
            let mut clients = target.connect().await?;
            println!(
                "{:<32} {:>8} {:>10} {:>10}  EVENTS",
                "NAME", "VERSION", "STATUS", "MEMBERS"
            );
            for s in list_all(&mut clients).await? {
                println!(
                    "{:<32} {:>8} {:>10} {:>10}  {}",
                    s.name,
                    s.version,
                    status_name(s.status),
                    s.member_count,
                    s.event_names.join(",")
                );
            }
        }
        SegmentCommand::Get { name, target } => {
            let mut clients = target.connect().await?;
            let s = clients
                .segments
                .get(pb::GetSegmentRequest { name, version: 0 })
                .await?
                .into_inner();
            println!(
                "# segment/{} version {} of {} — {}, {} members",
                s.name,
                s.version,
                s.latest_version,
                status_name(s.status),
                s.member_count
            );
            print!("{}", s.yaml);
        }
        SegmentCommand::Count { name, target } => {
            let mut clients = target.connect().await?;
            let count = clients
                .segments
                .count(pb::CountSegmentRequest { name })
                .await?
                .into_inner();
            println!("{}", count.count);
        }
        SegmentCommand::Members {
            name,
            limit,
            target,
        } => {
            let mut clients = target.connect().await?;
            let mut stream = clients
                .segments
                .list_members(pb::ListSegmentMembersRequest {
                    name,
                    limit,
                    page_size: 5000,
                    ..Default::default()
                })
                .await?
                .into_inner();
            while let Some(page) = stream.message().await? {
                for member in &page.members {
                    println!("{}", member_line(member));
                }
            }
        }
        SegmentCommand::Preview {
            file,
            sample,
            target,
        } => {
            let yaml = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut clients = target.connect().await?;
            let preview = clients
                .segments
                .preview(pb::PreviewSegmentRequest {
                    yaml,
                    sample_size: sample,
                })
                .await?
                .into_inner();
            if !preview.errors.is_empty() {
                for error in &preview.errors {
                    eprintln!(
                        "{}:{}:{}: {}: {}",
                        file.display(),
                        error.line,
                        error.column,
                        error.field,
                        error.reason
                    );
                }
                return Ok(ExitCode::from(crate::exit::PARTIAL));
            }
            let share = if preview.population > 0 {
                100.0 * preview.count as f64 / preview.population as f64
            } else {
                0.0
            };
            println!(
                "{} of {} customers ({share:.1}%)",
                preview.count, preview.population
            );
            for member in &preview.sample {
                println!("  {}", member_line(member));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
