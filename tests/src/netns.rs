//! Network namespaces, veth pairs and taps for tests (see the netns tests).
