variable "region" {
  description = "AWS region; three of its availability zones are used."
  type        = string
  default     = "eu-west-1"
}

variable "availability_zones" {
  description = "The three availability zones of var.region the VPC spans."
  type        = list(string)
  default     = ["eu-west-1a", "eu-west-1b", "eu-west-1c"]
  validation {
    condition     = length(var.availability_zones) == 3
    error_message = "medimg spans exactly three availability zones."
  }
}

variable "environment" {
  description = "Name of this environment (prod, staging): prefixes every resource."
  type        = string
  default     = "prod"
}

variable "vpc_cidr" {
  description = "The VPC's CIDR; deploy/k8s/overlays/prod lets the services reach PostgreSQL and Redis in it."
  type        = string
  default     = "10.40.0.0/16"
}

variable "kubernetes_version" {
  description = "EKS version (native sidecar containers need 1.29 or later)."
  type        = string
  default     = "1.33"
}

variable "cluster_admin_cidrs" {
  description = "CIDRs allowed to reach the EKS API endpoint (the operators' VPN)."
  type        = list(string)
  default     = ["10.0.0.0/8"]
}

variable "general_instance_types" {
  type    = list(string)
  default = ["m7i.2xlarge"]
}

variable "gpu_instance_types" {
  type    = list(string)
  default = ["g5.2xlarge"]
}

variable "db_instance_class" {
  type    = string
  default = "db.r7g.large"
}

variable "redis_node_type" {
  type    = string
  default = "cache.r7g.large"
}

variable "namespace" {
  description = "Kubernetes namespace of medimg (deploy/mesh.toml namespace)."
  type        = string
  default     = "medimg"
}
