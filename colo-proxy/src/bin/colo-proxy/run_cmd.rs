pub fn run(_: crate::options::RunArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
