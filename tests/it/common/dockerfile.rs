//! The repo's `Dockerfile` as the tests read it: its stages with their
//! instructions, and the image each `docker build` line of its header names.

use outbox_testkit::repo_root;
use std::collections::BTreeMap;

/// One `FROM … AS name` stage and its instructions, in order, as
/// (INSTRUCTION, arguments); continuation lines are joined.
pub struct Stage {
    pub name: String,
    pub instructions: Vec<(String, String)>,
}

impl Stage {
    /// The arguments of the last `instruction` (`USER`, `EXPOSE`, …) in it.
    pub fn last(&self, instruction: &str) -> Option<&str> {
        self.instructions
            .iter()
            .rev()
            .find(|(i, _)| i == instruction)
            .map(|(_, args)| args.as_str())
    }

    /// The value its `ENV` instructions give `name`.
    pub fn env(&self, name: &str) -> Option<&str> {
        self.instructions
            .iter()
            .rev()
            .filter(|(i, _)| i == "ENV")
            .flat_map(|(_, args)| args.split_whitespace())
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
    }
}

fn text() -> String {
    std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap()
}

pub fn stages() -> Vec<Stage> {
    let text = text().replace("\\\n", " ");
    let mut stages: Vec<Stage> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (instruction, args) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let instruction = instruction.to_ascii_uppercase();
        if instruction == "FROM" {
            let words: Vec<&str> = args.split_whitespace().collect();
            if let [_, as_, name] = words.as_slice() {
                if as_.eq_ignore_ascii_case("AS") {
                    stages.push(Stage {
                        name: name.to_string(),
                        instructions: Vec::new(),
                    });
                }
            }
        } else if let Some(stage) = stages.last_mut() {
            stage
                .instructions
                .push((instruction, args.trim().to_owned()));
        }
    }
    stages
}

pub fn stage(name: &str) -> Stage {
    stages()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("the Dockerfile has no stage {name}"))
}

/// Build target → image name, from the header's `docker build … -t NAME`
/// lines; a line without `--target` builds the last stage.
pub fn built_images() -> BTreeMap<String, String> {
    let last = stages().pop().expect("the Dockerfile has stages").name;
    let mut images = BTreeMap::new();
    for line in text().lines().filter(|l| l.starts_with('#')) {
        let Some((_, command)) = line.split_once("docker build") else {
            continue;
        };
        let words: Vec<&str> = command.split_whitespace().collect();
        let after = |flag: &str| {
            words
                .iter()
                .position(|w| *w == flag)
                .map(|i| words[i + 1].to_owned())
        };
        if let Some(name) = after("-t") {
            images.insert(after("--target").unwrap_or_else(|| last.clone()), name);
        }
    }
    images
}
